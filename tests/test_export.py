"""`fedmeerkat export` and `apply-delta` on the tiny model: the exported folder loads with plain
transformers (or peft) and scores what `fedmeerkat eval RUN_DIR` scores, holds every tensor
with the trained values, and the small delta rebuilds it exactly on the base model only."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmeerkat.cli.main import main
from fedmeerkat.models.loading import load_model, model_fingerprint
from fedmeerkat.models.tiny import save_tiny_llama
from fedmeerkat.runners.run_folder import load_run_state

WORDS = ("the movie was great terrible good bad fun dull boring lovely awful plot actors "
         "film it is a an and but so very not review").split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny two-class dataset and calibration text of conftest, for module-scoped runs."""
    root = tmp_path_factory.mktemp("export_data")
    rng = random.Random(0)
    pos, neg = ["great", "good", "fun", "lovely"], ["terrible", "bad", "dull", "awful"]
    rows = ["sentence,label"] + [
        f"the film was {rng.choice(pos if i % 2 else neg)} and "
        f"{rng.choice(pos if i % 2 else neg)},{i % 2}" for i in range(80)]
    (root / "reviews.csv").write_text("\n".join(rows) + "\n")
    (root / "calib.txt").write_text("\n".join(
        " ".join(["the film was a very good film and the actors were lovely"] * 3)
        for _ in range(8)) + "\n")
    with pytest.MonkeyPatch.context() as mp:  # masks go to a temp cache, never the user's
        mp.setenv("FEDMEERKAT_CACHE", str(root / "cache"))
        yield root


def _train(model_dir: str, data: Path, out: Path, *extra: str) -> Path:
    assert main(["run", f"model={model_dir}", "task=local", f"data_files={data / 'reviews.csv'}",
                 "template={sentence} so it was", "label_words=[' bad', ' good']",
                 f"calib_corpus={data / 'calib.txt'}", "calib_sequences=4", "calib_seq_len=32",
                 "density=0.01", "clients=4", "rounds=2", "local_steps=2", "batch_size=4",
                 "lr=0.05", "eval_every=0", f"out={out}", "--quiet", *extra]) == 0
    return out


def _export(run_dir: Path, out: Path) -> Path:
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def meerkat(tiny_model_dir, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("meerkat")
    run_dir = _train(tiny_model_dir, data, root / "run")
    return run_dir, _export(run_dir, root / "export")


def _eval(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_exported_model_loads_with_transformers_and_scores_like_eval(
        meerkat, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, exp = meerkat
    assert sorted(p.name for p in exp.iterdir()) == ["delta.safetensors", "model"]
    model = AutoModelForCausalLM.from_pretrained(exp / "model", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(exp / "model", local_files_only=True)
    base_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok(" good the film").input_ids == base_tok(" good the film").input_ids
    assert type(model).__name__ == "LlamaForCausalLM"

    ran = _eval(capsys, str(run_dir))
    exported = _eval(capsys, str(run_dir / "config.toml"), f"model={exp / 'model'}")
    assert exported["weights"] == "zero-shot"  # scored as a plain model, no run folder involved
    for key in ("test_accuracy", "test_loss", "predicted_share", "examples"):
        assert exported[key] == ran[key], key

    # every tensor of the base is in the file; masked coordinates hold theta, the rest the base
    mask, theta = load_run_state(run_dir)
    got, base = _weights(exp / "model"), _weights(Path(tiny_model_dir))
    assert got.keys() == base.keys()
    want = {k: v.clone() for k, v in base.items()}
    for name, idx, sl in mask.slices():
        want[name].view(-1)[idx] = theta[sl].to(want[name].dtype)
    changed = 0
    for k in base:
        assert torch.equal(got[k], want[k]), k
        changed += int((got[k] != base[k]).sum())
    assert changed > 0.5 * mask.nnz and len(mask.names) > 1  # training moved many tensors


def test_delta_rebuilds_the_exported_model_and_is_small(meerkat, tiny_model_dir, tmp_path, capsys):
    run_dir, exp = meerkat
    delta = exp / "delta.safetensors"
    # no --model: the base recorded in the delta
    assert main(["apply-delta", str(delta), "--out", str(tmp_path / "rebuilt")]) == 0
    assert "values in" in capsys.readouterr().out
    rebuilt, exported = _weights(tmp_path / "rebuilt"), _weights(exp / "model")
    assert rebuilt.keys() == exported.keys()
    assert all(torch.equal(rebuilt[k], exported[k]) for k in exported)
    assert (tmp_path / "rebuilt" / "tokenizer.json").is_file()

    mask, _ = load_run_state(run_dir)
    raw = delta.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) == 8 + header + 12 * mask.nnz  # int64 index + float32 value per weight
    assert header < 400 * len(mask.names) + 2000
    meta = json.loads(raw[8:8 + header])["__metadata__"]
    fp = model_fingerprint(load_model(tiny_model_dir)[0])
    assert meta["base_fingerprint_structure"] == fp["structure"]
    assert meta["base_fingerprint_weights"] == fp["weights"]
    assert (meta["base_model"], meta["method"], meta["rounds"]) == (tiny_model_dir, "meerkat", "2")
    assert meta["format"] == "fedmeerkat-delta" and meta["format_version"] == "1"


@pytest.mark.parametrize("other,why", [
    ({"seed": 1}, "other weights of the same architecture"),
    ({"num_layers": 3}, "another architecture"),
])
def test_delta_on_another_model_is_refused(meerkat, tmp_path, capsys, other, why):
    _, exp = meerkat
    model = save_tiny_llama(tmp_path / "other", vocab_words=WORDS, **other)
    out = tmp_path / "applied"
    assert main(["apply-delta", str(exp / "delta.safetensors"), "--model", str(model),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and "\n" not in err
    assert not out.exists()


def test_a_file_that_is_no_delta_is_refused(meerkat, tmp_path, capsys):
    run_dir, _ = meerkat
    assert main(["apply-delta", str(run_dir / "mask.safetensors"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a fedmeerkat delta" in capsys.readouterr().err


def test_lora_run_exports_a_peft_adapter_scoring_like_eval(tiny_model_dir, data, tmp_path, capsys):
    from peft import PeftModel

    from fedmeerkat.models.scoring import LabelScorer, evaluate
    from fedmeerkat.runners.prepare import prepare
    from fedmeerkat.runners.run_folder import load_run_config

    run_dir = _train(tiny_model_dir, data, tmp_path / "run", "method=lora-fedzo", "lora_rank=4")
    exp = _export(run_dir, tmp_path / "export")
    assert sorted(p.name for p in exp.iterdir()) == ["adapter", "model"]  # no delta for LoRA
    assert (exp / "adapter" / "adapter_config.json").is_file()

    ran = _eval(capsys, str(run_dir))
    prep = prepare(load_run_config(run_dir))  # the base model and the run's test set
    peft_model = PeftModel.from_pretrained(prep.model, str(exp / "adapter"))
    res = evaluate(LabelScorer(peft_model, prep.tokenizer, prep.task.spec.label_words),
                   prep.test_ids, prep.test_labels)
    assert res.accuracy == ran["test_accuracy"]
    assert res.loss == pytest.approx(ran["test_loss"], abs=1e-6)
    # the adapter holds the run's trained values
    _, theta = load_run_state(run_dir)
    lora = [p for n, p in peft_model.named_parameters() if ".lora_" in n]
    assert sum(p.numel() for p in lora) == theta.numel()
    assert any(bool(p.abs().sum() > 0) for n, p in peft_model.named_parameters() if "lora_B" in n)

    merged = _eval(capsys, str(run_dir / "config.toml"), f"model={exp / 'model'}")
    assert merged["test_accuracy"] == ran["test_accuracy"]
    assert merged["test_loss"] == pytest.approx(ran["test_loss"], abs=1e-5)


def test_dense_run_exports_the_model_and_no_delta(tiny_model_dir, data, tmp_path, capsys):
    run_dir = _train(tiny_model_dir, data, tmp_path / "run", "method=full-fedzo", "rounds=1")
    capsys.readouterr()
    exp = _export(run_dir, tmp_path / "export")
    assert "no delta" in capsys.readouterr().out
    assert [p.name for p in exp.iterdir()] == ["model"]
    space, theta = load_run_state(run_dir)
    got = _weights(exp / "model")
    for name, shape, start, stop in zip(space.names, space.shapes, space.offsets[:-1],
                                        space.offsets[1:], strict=True):
        assert torch.equal(got[name], theta[start:stop].view(shape)), name


def test_non_empty_out_is_refused_and_an_empty_one_is_used(meerkat, tmp_path, capsys):
    run_dir, exp = meerkat
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for cmd in (["export", str(run_dir)], ["apply-delta", str(exp / "delta.safetensors")]):
        assert main([*cmd, "--out", str(busy)]) == 2
        err = capsys.readouterr().err.strip()
        assert "not an empty folder" in err and "\n" not in err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _export(run_dir, empty)
    assert torch.equal(_weights(empty / "model")["model.layers.0.self_attn.q_proj.weight"],
                       _weights(exp / "model")["model.layers.0.self_attn.q_proj.weight"])
    assert not list(tmp_path.glob(".*partial*"))  # no staging folder left behind


def _tampered_delta(delta: Path, path: Path, change) -> Path:
    """A copy of `delta` with its largest tensor's indices and values passed through `change`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(delta), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = max(json.loads(meta["names"]), key=lambda n: tensors[f"idx::{n}"].numel())
    tensors[f"idx::{name}"], tensors[f"val::{name}"] = change(tensors[f"idx::{name}"],
                                                              tensors[f"val::{name}"])
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("change,why", [
    (lambda i, v: (torch.cat([torch.tensor([-1]), i[1:]]), v), "outside"),  # the last weight
    (lambda i, v: (i, v[:-1]), "values"),
    (lambda i, v: (i[:-1], v), "values"),
    (lambda i, v: (i.float(), v), "integer"),
    (lambda i, v: (i.reshape(1, -1), v.reshape(1, -1)), "1-D"),
    (lambda i, v: (i + 10**9, v), "outside"),
])
def test_a_tampered_delta_is_one_line_exit_2(meerkat, tmp_path, capsys, change, why):
    """Issue 21: negative indices (which index_copy_ would reject with a traceback, or a
    negative-index write would put at the tensor's end) and length mismatches are refused."""
    _, exp = meerkat
    bad = _tampered_delta(exp / "delta.safetensors", tmp_path / "bad.safetensors", change)
    out = tmp_path / "applied"
    capsys.readouterr()
    assert main(["apply-delta", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()
