"""The scoring forward on CPU: fp32 against bf16 (fp32 masters), eager against torch.compile,
2 threads against 1.

    python benchmarks/cpu_forward.py [--compile] [--eval N]

On the packaged SmolLM2-135M, one batch of 16 Rotten Tomatoes prompts at max_length 48 (the
learning benchmark's setting), label-word scoring (models/scoring.py: decoder + 2 head rows).
Each variant: median of 5 forwards after 2 warm-ups. `--compile` adds torch.compile (inductor;
the first call compiles, timed apart). `--eval N` also scores N test reviews with the untrained
model in each dtype (the zero-shot ROC-AUC must agree within 0.005 before bf16 can be adopted).

bf16 here is `dtype=bfloat16` of the run config: the model's weights in bf16, the ZO master
vector theta in fp32 (zo/sparse.py writes theta +- eps*z rounded to the model's dtype).

Output: benchmarks/results/cpu_forward.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import timeit, write_result

from fedmeerkat.models.loading import load_model
from fedmeerkat.models.scoring import LabelScorer, encode_prompts, evaluate
from fedmeerkat.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--eval", type=int, default=0, help="test reviews scored per dtype (0 = none)")
    args = ap.parse_args()
    task = load_task("rotten_tomatoes", max_test=max(args.eval, 16), max_train=64)
    res: dict = {"batch": 16, "max_length": 48, "variants": {}}
    threads = torch.get_num_threads()
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model("smollm2-135m", dtype=dtype)
        scorer = LabelScorer(model, tok, task.spec.label_words)
        ex = task.train[:16]
        batch = scorer.collate(encode_prompts(tok, [task.spec.render(e) for e in ex], 48),
                               [e.label for e in ex])
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            res["variants"][f"{dtype}-eager-{n}threads"] = timeit(
                lambda scorer=scorer, batch=batch: scorer.loss(batch), repeat=5, warmup=2)
        torch.set_num_threads(threads)
        if args.compile:
            scorer.decoder = torch.compile(scorer.decoder)
            t = time.perf_counter()
            scorer.loss(batch)
            first = time.perf_counter() - t
            r = timeit(lambda scorer=scorer, batch=batch: scorer.loss(batch), repeat=5, warmup=1)
            res["variants"][f"{dtype}-compile-{threads}threads"] = {**r, "first_call_s": first}
            scorer.decoder = model.get_decoder()
        if args.eval:
            ids = [task.spec.render(e) for e in task.test[:args.eval]]
            enc = encode_prompts(tok, ids, 48)
            ev = evaluate(scorer, enc, [e.label for e in task.test[:args.eval]], 32)
            res[f"zero_shot_{dtype}"] = {"examples": ev.num_examples, "accuracy": ev.accuracy,
                                         "auc": ev.auc, "best_shift_accuracy": ev.best_shift_accuracy}
        del model, scorer
    base = res["variants"][f"float32-eager-{threads}threads"]["median_s"]
    for name, v in res["variants"].items():
        v["speedup_vs_fp32_eager"] = base / v["median_s"]
        print(f"{name:<28} {v['median_s']:.3f} s  x{v['speedup_vs_fp32_eager']:.2f}")
    if args.eval:
        res["zero_shot_auc_difference"] = abs(res["zero_shot_bfloat16"]["auc"]
                                              - res["zero_shot_float32"]["auc"])
    write_result("cpu_forward", res)


if __name__ == "__main__":
    main()
