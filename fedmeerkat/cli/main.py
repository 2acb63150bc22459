"""`fedmeerkat` command line: run, report, mask, eval, gradip, export, apply-delta, tasks,
config, methods, deploy.

    fedmeerkat run [CONFIG.toml] [key=value ...] [--dry-run]   federated training
    fedmeerkat run --resume RUN_DIR [rounds=N ...]              continue an interrupted run
    fedmeerkat report RUN_DIR                                   bytes and accuracy of a run
    fedmeerkat mask [CONFIG.toml] [key=value ...] --out FILE    compute a sparse mask
    fedmeerkat eval RUN_DIR [--best] | [CONFIG.toml] [key=value ...]
                                                                accuracy of a run / zero-shot
    fedmeerkat gradip [CONFIG.toml] [key=value ...] [--steps N] GradIP of an IID vs a
                                                                single-label client (Fig. 3)
    fedmeerkat export RUN_DIR --out DIR [--best]                a run's model as a HF folder,
                                                                plus a small delta / adapter
    fedmeerkat apply-delta DELTA [--model BASE] --out DIR       a delta on its base model
    fedmeerkat tasks                                            list the tasks
    fedmeerkat config                                           list every config key
    fedmeerkat methods                                          list the methods
    fedmeerkat deploy {provision,prepare,server,site,submit,abort} ...
                                                                on NVIDIA FLARE across
                                                                machines (docs/deploy.md)
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin while idle by default; with another process on the same cores
# that made a forward 5x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from fedmeerkat.config import (  # noqa: E402
    DTYPES,
    ConfigError,
    RunConfig,
    describe,
    load_config,
)


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """A leading non key=value argument is the config file; the rest are overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config(args: list[str]) -> RunConfig:
    path, overrides = _split(args)
    return load_config(path, overrides)


def _resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    from fedmeerkat.runners.run_folder import RunFolder

    return RunFolder(run_dir).resume_config(overrides)


def _schedule(s: dict) -> str:
    """"R rounds x K clients x T steps", with "k of K clients" where a round samples k of
    them (FedAvg client sampling: the demo's one of five clients a round is not five)."""
    per_round = s.get("clients_per_round") or s["clients"]
    drawn = " drawn by size" if s.get("client_sampling") == "size" else ""
    clients = (f"{per_round} of {s['clients']} clients{drawn}" if per_round < s["clients"]
               else f"{s['clients']} clients")
    return f"{s['rounds']} rounds x {clients} x {s['local_steps']} steps"


def cmd_run(ns: argparse.Namespace) -> int:
    if ns.resume:
        cfg = _resume_config(Path(ns.resume), ns.args)
    else:
        cfg = _config(ns.args)
    if ns.dry_run:
        import tomli_w

        print(tomli_w.dumps(cfg.to_dict()), end="")
        print("# config is valid; no model or data was loaded (--dry-run)", file=sys.stderr)
        return 0
    from fedmeerkat.runners.simulation import run

    s = run(cfg, quiet=ns.quiet, resume=bool(ns.resume))
    print(f"zero-shot test accuracy: {_num(s['initial_accuracy'])}")
    print(f"final test accuracy:     {_num(s['final_accuracy'])}  after {_schedule(s)}")
    print(f"predicted-class share:   {_share(s['initial_predicted_share'])} -> "
          f"{_share(s['final_predicted_share'])}")
    for key, name in (("auc", "ROC-AUC"), ("macro_f1", "macro-F1"),
                      ("best_shift_accuracy", "best-shift accuracy")):
        if s.get(f"initial_{key}") is not None or s.get(f"final_{key}") is not None:
            print(f"{name + ':':<24} {_num(s.get(f'initial_{key}'))} -> "
                  f"{_num(s.get(f'final_{key}'))}")
    if s.get("final_val_accuracy") is not None:
        key = "auc" if s.get("final_val_auc") is not None else "macro_f1"
        print(f"validation ({s['val_examples']} examples): accuracy "
              f"{_num(s.get('initial_val_accuracy'))} -> {_num(s.get('final_val_accuracy'))}, "
              f"{'ROC-AUC' if key == 'auc' else 'macro-F1'} {_num(s.get(f'initial_val_{key}'))}"
              f" -> {_num(s.get(f'final_val_{key}'))}; best round by validation: "
              f"{s.get('best_val_round')}"
              + (f" (its model: fedmeerkat export {s['out']} --best)"
                 if s.get("best_val_round") not in (None, s["rounds"]) else ""))
    print(f"verdict:                 {s['gain']}")
    print(f"bytes per client per round: up {s['upload_bytes_per_client']:.0f}, "
          f"down {s['download_bytes_per_client']:.0f}; wall {s['wall_seconds']:.0f} s")
    from fedmeerkat.report import plot_run

    plot_run(Path(s["out"]))
    print(f"run folder: {s['out']} (plot: accuracy.png)")
    return 0


def _share(x: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in x)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def cmd_mask(ns: argparse.Namespace) -> int:
    """Compute a mask of `mask_kind` for `model` (the kinds that need no client partition)."""
    cfg = _config(ns.args)
    if cfg.mask_kind == "union":
        raise ConfigError("mask_kind: 'union' needs the client partition; it is computed inside "
                          "`fedmeerkat run`")
    if cfg.mask_kind == "task-gradient":  # scored on the encoded, labelled training examples
        import numpy as np

        from fedmeerkat.runners.prepare import get_mask, prepare

        prep = prepare(cfg)
        mask, _ = get_mask(cfg, prep, [np.arange(len(prep.train_labels))], quiet=False)
        return _wrote_mask(cfg, mask, ns.out)
    from fedmeerkat.models.loading import load_model
    from fedmeerkat.runners.masks import make_mask_of_kind, pick_texts
    from fedmeerkat.tasks.corpora import load_calibration_texts

    task_texts = None
    if cfg.mask_kind == "task":
        from fedmeerkat.runners.prepare import load_task_for

        task = load_task_for(cfg)
        spec = task.spec
        task_texts = pick_texts([spec.render(e) + spec.label_words[e.label] for e in task.train],
                                cfg.calib_sequences, cfg.seed)
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    mask = make_mask_of_kind(model, tok, cfg.mask_kind, load_calibration_texts(cfg.calib_corpus),
                             model_name=cfg.model, density=cfg.density, rule=cfg.eligible,
                             corpus=cfg.calib_corpus, num_sequences=cfg.calib_sequences,
                             seq_len=cfg.calib_seq_len, seed=cfg.seed, task_texts=task_texts)
    return _wrote_mask(cfg, mask, ns.out)


def _wrote_mask(cfg, mask, out) -> int:
    mask.save(out)
    print(f"mask ({cfg.mask_kind}): {mask.nnz:,} of {mask.eligible_numel:,} eligible weights "
          f"(density {mask.density:.2e}) over {len(mask.names)} tensors -> {out}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from fedmeerkat.models.scoring import evaluate
    from fedmeerkat.runners.evaluation import test_record
    from fedmeerkat.runners.prepare import prepare
    from fedmeerkat.runners.run_folder import load_run_config

    run_dir = Path(ns.args[0]) if ns.args and Path(ns.args[0]).is_dir() else None
    if run_dir is not None:
        cfg = load_run_config(run_dir, ns.args[1:])
    else:
        if ns.best:
            from fedmeerkat.options import InputError

            raise InputError("--best reads a run folder's best validation round: give RUN_DIR")
        cfg = _config(ns.args)
    prep = prepare(cfg)
    what = "zero-shot"
    if run_dir is not None:
        from fedmeerkat.runners.spaces import restore_run_weights

        which = "best" if ns.best else "final"
        restore_run_weights(run_dir, cfg, prep.model, which)  # mask, LoRA adapter or dense
        what = f"run {run_dir}" + (" (best validation round)" if ns.best else "")
    res = evaluate(prep.scorer, prep.test_ids, prep.test_labels, cfg.eval_batch_size)
    print(json.dumps({"model": cfg.model, "task": cfg.task, "weights": what,
                      **test_record(res), "examples": res.num_examples}))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from fedmeerkat.runners.export import export_run, path_bytes

    res = export_run(Path(ns.run_dir), Path(ns.out), "best" if ns.best else "final")
    print(f"model:   {res.model}/  {_bytes(path_bytes(res.model))}  (Hugging Face folder with "
          "tokenizer: AutoModelForCausalLM.from_pretrained)")
    if res.delta is not None:
        print(f"delta:   {res.delta}  {_bytes(path_bytes(res.delta))}  ({res.nnz:,} trained "
              f"values in {res.tensors} tensors; fedmeerkat apply-delta)")
    if res.adapter is not None:
        print(f"adapter: {res.adapter}/  {_bytes(path_bytes(res.adapter))}  ({res.nnz:,} LoRA "
              "values; peft PeftModel.from_pretrained(base, adapter))")
    for note in res.notes:
        print(f"note: {note}")
    return 0


def cmd_apply_delta(ns: argparse.Namespace) -> int:
    from fedmeerkat.runners.export import apply_delta, path_bytes

    delta, base = apply_delta(Path(ns.delta), Path(ns.out), base=ns.model, dtype=ns.dtype)
    print(f"wrote {delta.nnz:,} values in {len(delta.names)} tensors onto a copy of {base} -> "
          f"{ns.out}/  {_bytes(path_bytes(Path(ns.out)))}")
    return 0


def _bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    unit = "B"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def cmd_gradip(ns: argparse.Namespace) -> int:
    if ns.steps < 1 or ns.window < 1 or ns.examples < 0:
        raise ConfigError("--steps and --window must be >= 1, --examples >= 0")
    path, overrides = _split(ns.args)
    # the VP detector's verdict reads the vp_* keys, which belong to method meerkat-vp
    cfg = load_config(path, ["method=meerkat-vp", *overrides])
    from fedmeerkat.runners.gradip_experiment import run_gradip

    res = run_gradip(cfg, steps=ns.steps, label=ns.label, examples=ns.examples,
                     window=ns.window, quiet=ns.quiet)
    for c in res["clients"]:
        g = [abs(x) for x in c["gradip"]]
        q = max(1, len(g) // 5)
        line = (f"{c['name']:>12}: mean |GradIP| first {q} steps {sum(g[:q]) / q:.4g}, "
                f"last {q} steps {sum(g[-q:]) / q:.4g}")
        if "vp" in c:
            v = c["vp"]
            line += (f"; VP rho_later {v['rho_later']:.2f}, rho_quie {v['rho_quie']:.2f} "
                     f"-> {'flagged' if v['flagged'] else 'not flagged'}")
        print(line)
    from fedmeerkat.report.gradip_plot import plot_gradip

    png = Path(res["paths"]["json"]).with_name("gradip.png")
    plot_gradip(res, png)
    print(f"gradip json: {res['paths']['json']}")
    print(f"gradip plot: {png}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from fedmeerkat.report import plot_run
    from fedmeerkat.report.table import run_report

    print(run_report(Path(ns.run_dir)))
    print(f"plot: {plot_run(Path(ns.run_dir))}")
    return 0


def cmd_tasks(ns: argparse.Namespace) -> int:
    from fedmeerkat.tasks import describe_tasks

    print(describe_tasks())
    return 0


def cmd_methods(ns: argparse.Namespace) -> int:
    from fedmeerkat.federated.methods import markdown_table

    print(markdown_table())
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmeerkat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="federated training (in-process simulation)")
    r.add_argument("args", nargs="*", help="[CONFIG.toml] [key=value ...]")
    r.add_argument("--dry-run", action="store_true", help="validate and print the config only")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its "
                   "last checkpoint (overrides limited to rounds, eval_every, ...)")
    r.set_defaults(fn=cmd_run)
    m = sub.add_parser("mask", help="compute a sparse mask from calibration text")
    m.add_argument("args", nargs="*", help="[CONFIG.toml] [key=value ...]")
    m.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    m.set_defaults(fn=cmd_mask)
    e = sub.add_parser("eval", help="test accuracy of a run folder, or zero-shot")
    e.add_argument("args", nargs="*", help="RUN_DIR [key=value ...] | [CONFIG.toml] [key=value ...]")
    e.add_argument("--best", action="store_true", help="RUN_DIR's best validation round "
                   "(best_state.safetensors) instead of its final model")
    e.set_defaults(fn=cmd_eval)
    g = sub.add_parser("gradip", help="GradIP of an IID vs a single-label client (paper Fig. 3)")
    g.add_argument("args", nargs="*", help="[CONFIG.toml] [key=value ...] (out= is the folder)")
    g.add_argument("--steps", type=int, default=100, help="local ZO steps per client (100)")
    g.add_argument("--label", type=int, default=0, help="class of the single-label client (0)")
    g.add_argument("--examples", type=int, default=0, help="examples per client (0 = "
                   "min(steps * batch_size, half the training set, half the class))")
    g.add_argument("--window", type=int, default=10, help="moving-average window (10)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(fn=cmd_gradip)
    rep = sub.add_parser("report", help="table of a run: accuracy, bytes, dense comparison")
    rep.add_argument("run_dir")
    rep.set_defaults(fn=cmd_report)
    x = sub.add_parser("export", help="a run's trained model as a Hugging Face folder, plus a "
                       "small delta (mask runs) or a peft adapter (LoRA runs)")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="new or empty folder to write")
    x.add_argument("--best", action="store_true", help="the round with the best validation "
                   "metric (best_state.safetensors) instead of the final model")
    x.set_defaults(fn=cmd_export)
    a = sub.add_parser("apply-delta", help="write an exported delta.safetensors into its base "
                       "model and save the result as a Hugging Face folder")
    a.add_argument("delta", help="delta.safetensors from `fedmeerkat export`")
    a.add_argument("--model", help="base model: hub id, folder or smollm2-135m (default: the "
                   "one the delta records); its fingerprint must match")
    a.add_argument("--out", required=True, help="new or empty folder to write")
    a.add_argument("--dtype", choices=DTYPES, help="dtype to load and save the "
                   "model in (default: the run's)")
    a.set_defaults(fn=cmd_apply_delta)
    sub.add_parser("tasks", help="list tasks").set_defaults(fn=cmd_tasks)
    sub.add_parser("config", help="list every config key and default").set_defaults(fn=cmd_config)
    sub.add_parser("methods", help="list the methods (the README's table)").set_defaults(
        fn=cmd_methods)
    from fedmeerkat.cli.deploy import add_parser as add_deploy  # nvflare loads only when used

    add_deploy(sub)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after flags (`run --quiet lr=1e-3`): collect the leftovers.
    ns, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (extra and not hasattr(ns, "args")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        ns.args = list(ns.args) + extra
    from fedmeerkat.models.loading import ModelLoadError
    from fedmeerkat.options import InputError
    from fedmeerkat.runners.driver import RoundFailed

    try:
        return ns.fn(ns)
    except ConfigError as e:
        print(f"fedmeerkat: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    # bad input (a file, data, a mask, a checkpoint, a folder): one line, exit code 2
    except (InputError, FileNotFoundError, FileExistsError) as e:
        print(f"fedmeerkat: error: {_one_line(e)}", file=sys.stderr)
        return 2
    # a failure while working on sound input (e.g. the hub cannot be reached): exit code 1
    except (ModelLoadError, NotImplementedError, ConnectionError) as e:
        print(f"fedmeerkat: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except RoundFailed as e:  # too few usable replies: the checkpoint holds the last good round
        print(f"fedmeerkat: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("fedmeerkat: interrupted; metrics.jsonl and the last round's state are on disk",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
