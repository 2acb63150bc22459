"""Mask kinds (calibration, weight-magnitude, random, task, union, task-gradient) on the tiny Llama
(seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmeerkat.cli.main import main
from fedmeerkat.config import ConfigError, build_config
from fedmeerkat.models.loading import load_model
from fedmeerkat.models.scoring import lm_loss
from fedmeerkat.runners.masks import calibration_sequences, obtain_mask
from fedmeerkat.tasks.corpora import load_calibration_texts
from fedmeerkat.zo import SparseMask, compute_mask, eligible_parameters
from fedmeerkat.zo.calibration import masked_mean_gradient
from fedmeerkat.zo.mask_kinds import _distinct_positions, random_mask, union_masks

DENSITY = 0.01
TASK_TEXTS = [f"the film was {a} and {b} so it was{' good' if i % 2 else ' bad'}"
              for i, (a, b) in enumerate([("great", "fun"), ("bad", "dull"), ("good", "lovely"),
                                          ("awful", "boring"), ("fun", "good"), ("dull", "bad"),
                                          ("lovely", "great"), ("boring", "awful")])]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def _obtain(tiny, calib_txt, kind, **kw):
    model, tok = tiny
    kw.setdefault("seed", 0)
    return obtain_mask(model, tok, model_name=kw.pop("model_name", "tiny"),
                       density=kw.pop("density", DENSITY),
                       rule=r"(^|\.)layers\.\d+\..*\.weight$", corpus=calib_txt, num_sequences=4,
                       seq_len=32, quiet=True, kind=kind, **kw)


def _k(model, density=DENSITY):
    total = sum(p.numel() for _, p in eligible_parameters(model.named_parameters()))
    return max(1, round(density * total)), total


def _coords(mask: SparseMask) -> set[tuple[str, int]]:
    return {(n, int(i)) for n, idx in zip(mask.names, mask.indices, strict=True) for i in idx}


@pytest.mark.parametrize("kind", ["calibration", "weight-magnitude", "random", "task"])
def test_each_kind_keeps_exactly_k_and_carries_a_reference_gradient(
        tiny, calib_txt, isolated_cache, kind):
    mask, source = _obtain(tiny, calib_txt, kind, task_texts=TASK_TEXTS)
    k, total = _k(tiny[0])
    assert mask.nnz == k and mask.eligible_numel == total
    assert mask.meta["mask_kind"] == kind
    for idx, shape in zip(mask.indices, mask.shapes, strict=True):
        assert torch.equal(idx, torch.unique(idx)) and (idx.numel() == 0 or int(idx.max()) < np.prod(shape))
    assert mask.calib_grad is not None and mask.calib_grad.numel() == k
    assert torch.isfinite(mask.calib_grad).all() and mask.calib_grad.abs().sum() > 0
    assert source.startswith("computed")
    again, source2 = _obtain(tiny, calib_txt, kind, task_texts=TASK_TEXTS)
    assert source2.startswith("cache") and _coords(again) == _coords(mask)
    assert again.meta["mask_kind"] == kind and torch.equal(again.calib_grad, mask.calib_grad)


def test_kinds_get_their_own_cache_entries(tiny, calib_txt, isolated_cache):
    a, _ = _obtain(tiny, calib_txt, "calibration")
    b, src = _obtain(tiny, calib_txt, "weight-magnitude")
    c, src_c = _obtain(tiny, calib_txt, "task", task_texts=TASK_TEXTS[:5])
    d, src_d = _obtain(tiny, calib_txt, "task", task_texts=TASK_TEXTS[:6])
    assert src.startswith("computed") and src_c.startswith("computed") and src_d.startswith("computed")
    assert _coords(a) != _coords(b)
    assert len(list((isolated_cache / "masks").glob("*.safetensors"))) == 4


def test_a_bf16_model_gets_the_fp32_checkpoints_mask(tiny, tiny_model_dir, calib_txt,
                                                     isolated_cache, monkeypatch):
    # computed from a float32 load of the same checkpoint, so the mask never depends on the
    # inference dtype: one cache entry, the same coordinates, and the bf16 model is untouched
    m32, src32 = _obtain(tiny, calib_txt, "calibration")
    bf16 = load_model(tiny_model_dir, dtype="bfloat16")
    before = {n: t.clone() for n, t in bf16[0].state_dict().items()}
    m16, src16 = _obtain(bf16, calib_txt, "calibration")
    assert src32.startswith("computed") and src16.startswith("cache")
    assert _coords(m16) == _coords(m32)
    import fedmeerkat.runners.masks as masks

    for f in (isolated_cache / "masks").glob("*.safetensors"):
        f.unlink()
    seen = []
    real = masks.make_mask_of_kind

    def spy(model, *a, **kw):
        seen.append({p.dtype for p in model.parameters()})
        return real(model, *a, **kw)

    monkeypatch.setattr(masks, "make_mask_of_kind", spy)
    # computed from the bf16 run's side: it loads the checkpoint again in float32
    again, src = _obtain(bf16, calib_txt, "calibration", model_name=tiny_model_dir)
    assert src.startswith("computed") and seen == [{torch.float32}]
    assert _coords(again) == _coords(m32) and torch.equal(again.calib_grad, m32.calib_grad)
    after = bf16[0].state_dict()
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype
               for n in before)


def test_random_mask_is_exact_and_seeded(tiny, calib_txt, isolated_cache):
    model = tiny[0]
    m0, _ = _obtain(tiny, calib_txt, "random", seed=0)
    m0b, src = _obtain(tiny, calib_txt, "random", seed=0)
    m1, src1 = _obtain(tiny, calib_txt, "random", seed=1)
    assert src.startswith("cache") and src1.startswith("computed")
    k, total = _k(model)
    assert m0.density == k / total and m1.nnz == k and m0.meta["seed"] == "0"
    assert _coords(m0) == _coords(m0b) and _coords(m0) != _coords(m1)
    # direct, uncached: same seed same mask; exact at high density too (complement path)
    assert _coords(random_mask(model, density=DENSITY, seed=0)) == _coords(m0)
    for u in (0.3, 0.7, 1.0):
        m = random_mask(model, density=u, seed=3)
        assert m.nnz == _k(model, u)[0]
        assert all(torch.equal(i, torch.unique(i)) for i in m.indices)


def test_random_positions_are_uniform():
    counts = np.zeros(10)
    for s in range(3000):
        pos = _distinct_positions(np.random.default_rng(s), 10, 3)
        assert len(set(pos.tolist())) == 3
        counts[pos] += 1
    assert np.allclose(counts / 3000, 0.3, atol=0.03)


def test_weight_magnitude_is_the_brute_force_top_abs(tiny, calib_txt, isolated_cache):
    model = tiny[0]
    mask, _ = _obtain(tiny, calib_txt, "weight-magnitude")
    params = eligible_parameters(model.named_parameters())
    flat = torch.cat([p.detach().abs().reshape(-1) for _, p in params])
    k, _ = _k(model)
    top = torch.topk(flat, k).indices
    offsets = np.cumsum([0] + [p.numel() for _, p in params])
    want = set()
    for g in top.tolist():
        t = int(np.searchsorted(offsets, g, side="right") - 1)
        want.add((params[t][0], g - int(offsets[t])))
    assert _coords(mask) == want


def test_masked_mean_gradient_matches_the_calibration_pass(tiny, calib_txt):
    model, tok = tiny
    seqs = calibration_sequences(tok, load_calibration_texts(calib_txt), 3, 32)
    mask = compute_mask(model, seqs, lm_loss, density=DENSITY)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = masked_mean_gradient(model, seqs, lm_loss, mask)
    assert torch.allclose(ref, mask.calib_grad, rtol=1e-4, atol=1e-7)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_union_contains_every_client_mask_and_reports_its_density(tiny, calib_txt, isolated_cache):
    clients = [TASK_TEXTS[0:3], TASK_TEXTS[3:6], TASK_TEXTS[6:8]]  # <= 4 each: all used
    union, source = _obtain(tiny, calib_txt, "union", client_texts=clients)
    k, total = _k(tiny[0])
    assert union.meta["mask_kind"] == "union" and union.meta["union_parts"] == "3"
    assert float(union.meta["union_density"]) == union.density >= DENSITY
    assert "union density" in source and f"{union.density:.2e}" in source
    assert union.calib_grad is not None and union.calib_grad.numel() == union.nnz
    coords = _coords(union)
    parts = []
    for texts in clients:
        part, _ = _obtain(tiny, calib_txt, "task", task_texts=texts)
        assert part.nnz == k and _coords(part) <= coords
        parts.append(_coords(part))
    assert coords == set().union(*parts)
    assert union.nnz > k  # different data, different masks
    cached, src = _obtain(tiny, calib_txt, "union", client_texts=clients)
    assert src.startswith("cache") and "union density" in src and _coords(cached) == coords


def test_union_refuses_masks_over_other_tensors(tiny):
    model = tiny[0]
    a = random_mask(model, density=DENSITY, seed=0)
    b = random_mask(model, density=DENSITY, seed=1, rule=r"layers\.0\..*\.weight$")
    with pytest.raises(ValueError, match="different tensors"):
        union_masks([a, b])


def test_mask_kind_config_checks(tmp_path):
    assert build_config({}).mask_kind == "calibration"
    with pytest.raises(ConfigError, match="mask_kind: 'magnitude' is not one of"):
        build_config({"mask_kind": "magnitude"})
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="mask_kind"):
        build_config({"mask": str(f), "mask_kind": "random"})


def _run_args(tiny_model_dir, sentiment_csv, calib_txt, out, kind):
    return ["run", f"model={tiny_model_dir}", "task=local", f"data_files={sentiment_csv}",
            "template={sentence} so it was", "label_words=[' bad', ' good']",
            f"calib_corpus={calib_txt}", "calib_sequences=3", "calib_seq_len=32",
            "density=0.01", "clients=3", "rounds=1", "local_steps=1", "batch_size=4",
            "eval_every=0", "max_test=8", f"mask_kind={kind}", f"out={out}", "--quiet"]


class _Toy(torch.nn.Module):
    """One eligible 1 x 3 weight whose gradient for an "example" is the example itself."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, 3))


def _toy_mask(score: str, k: int, examples) -> set[int]:
    mask = compute_mask(_Toy(), examples, lambda m, x: (m.weight * x).sum(), density=k / 3,
                        rule=r"^weight$", score=score)
    return set(mask.indices[0].tolist())


def test_signal_score_is_the_unbiased_squared_mean_gradient():
    # per-example gradients over 4 examples: coordinate 0 alternates 5, 0 (mean 2.5: raw mean^2
    # 6.25, but unbiased (4 * 6.25 - 12.5) / 3 = 4.17), coordinate 1 is always 2.2 (4.84 either
    # way), coordinate 2 alternates +-10 (mean 0, yet the largest squared gradient, 100)
    examples = [torch.tensor([[5.0 if s > 0 else 0.0, 2.2, s * 10.0]]) for s in (1, -1, 1, -1)]
    assert _toy_mask("squared", 1, examples) == {2}  # the paper's calibration score
    assert _toy_mask("squared", 2, examples) == {0, 2}
    assert _toy_mask("signal", 1, examples) == {1}  # a raw mean^2 would take coordinate 0
    assert _toy_mask("signal", 2, examples) == {0, 1}
    with pytest.raises(ValueError, match="at least 2"):
        _toy_mask("signal", 1, examples[:1])
    with pytest.raises(ValueError, match="score"):
        _toy_mask("cubed", 1, examples)


def _labelled(tok, texts):
    return [(tok(t).input_ids, i % 2) for i, t in enumerate(texts)]


def test_task_gradient_mask_is_exact_seeded_and_cached_by_its_examples(tiny, calib_txt,
                                                                    isolated_cache):
    model, tok = tiny
    examples = _labelled(tok, [t.rsplit(" ", 1)[0] for t in TASK_TEXTS])
    kw = {"examples": examples, "label_words": [" bad", " good"], "num_examples": 6}
    mask, src = _obtain(tiny, calib_txt, "task-gradient", **kw)
    k, total = _k(model)
    assert src.startswith("computed") and mask.nnz == k and mask.eligible_numel == total
    assert mask.meta["mask_kind"] == "task-gradient" and mask.meta["score"] == "signal"
    assert mask.meta["num_sequences"] == "6"  # num_examples of the 8, by seed
    # the GradIP reference is the general text's, as for every kind but calibration
    assert mask.meta["calib_grad_source"] == "calib_corpus"
    assert mask.calib_grad.numel() == k and mask.calib_grad.abs().sum() > 0
    again, src2 = _obtain(tiny, calib_txt, "task-gradient", **kw)
    assert src2.startswith("cache") and _coords(again) == _coords(mask)
    other, src3 = _obtain(tiny, calib_txt, "task-gradient", **{**kw, "seed": 1})
    flipped, src4 = _obtain(tiny, calib_txt, "task-gradient",
                            **{**kw, "examples": [(ids, 1 - y) for ids, y in examples]})
    assert src3.startswith("computed") and src4.startswith("computed")
    # another sample, or the same prompts with other labels, scores other coordinates
    assert _coords(other) != _coords(mask) and _coords(flipped) != _coords(mask)
    with pytest.raises(ValueError, match="labelled"):
        _obtain(tiny, calib_txt, "task-gradient", examples=examples[:1], label_words=[" bad", " good"])


@pytest.mark.parametrize("kind", ["random", "union", "task-gradient"])
def test_cli_run_with_mask_kind(kind, tiny_model_dir, sentiment_csv, calib_txt, isolated_cache,
                                tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(tiny_model_dir, sentiment_csv, calib_txt, out, kind)) == 0
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    mask = SparseMask.load(out / "mask.safetensors")
    assert summary["mask_kind"] == kind and mask.meta["mask_kind"] == kind
    assert mask.calib_grad is not None
    total = mask.eligible_numel
    k = max(1, round(0.01 * total))
    if kind == "random":
        assert mask.nnz == k and mask.meta["seed"] == "0"
    elif kind == "task-gradient":  # scored on the training pool's labelled examples (fewer than 256)
        assert mask.nnz == k and int(mask.meta["num_sequences"]) == summary["train_examples"]
    else:
        assert mask.nnz >= k and mask.meta["union_parts"] == "3"
        assert "union density" in err and "union density" in summary["mask_source"]
