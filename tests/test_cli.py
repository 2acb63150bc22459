"""End-to-end CLI on a tiny random Llama and a tiny local dataset (seconds)."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from fedmeerkat.cli.main import main


def _args(tiny_model_dir, sentiment_csv, calib_txt, out, *extra):
    return ["run", f"model={tiny_model_dir}", "task=local", f"data_files={sentiment_csv}",
            "template={sentence} so it was", "label_words=[' bad', ' good']",
            f"calib_corpus={calib_txt}", "calib_sequences=4", "calib_seq_len=32",
            "density=0.01", "clients=4", "rounds=3", "local_steps=2", "batch_size=4",
            "lr=0.01", "eval_every=2", "partition=dirichlet", "alpha=0.5", f"out={out}",
            "--quiet", *extra]


def test_run_writes_every_output_and_eval_reproduces_it(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out)) == 0
    printed = capsys.readouterr().out
    assert "zero-shot test accuracy" in printed and "final test accuracy" in printed
    assert "after 3 rounds x 4 clients x 2 steps" in printed
    for name in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png",
                 "final_state.safetensors", "mask.safetensors", "partition.json"):
        assert (out / name).is_file(), name
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["clients"] == 4 and cfg["out"] == str(out)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2, 3]
    assert [x["test_accuracy"] is not None for x in lines] == [True, False, True, True]
    assert all(x["bytes_up"] > 0 and x["bytes_down"] > 0 for x in lines[1:])
    assert all(x["client_steps"] == {str(k): 2 for k in range(4)} for x in lines[1:])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("initial_accuracy", "final_accuracy", "rounds", "clients", "local_steps",
                "density", "upload_bytes_per_client", "download_bytes_per_client", "wall_seconds"):
        assert key in summary, key
    assert summary["final_accuracy"] == lines[-1]["test_accuracy"]
    # threshold-free metrics beside accuracy in every evaluated round and the summary
    tf = ("test_auc", "test_macro_f1", "test_best_shift_accuracy")
    for x in lines:
        assert all((x.get(k) is not None) == (x["test_accuracy"] is not None) for k in tf), x
        if x["test_accuracy"] is not None:
            assert 0 <= x["test_auc"] <= 1 and x["test_best_shift_accuracy"] >= x["test_accuracy"]
    for k in tf:
        assert summary[k.replace("test_", "initial_")] == lines[0][k]
        assert summary[k.replace("test_", "final_")] == lines[-1][k]
    assert "ROC-AUC:" in printed and "best-shift accuracy:" in printed
    # upload: 2 float32 scalars + a safetensors header; download adds the sparse vector
    nnz = summary["mask_nnz"]
    assert 8 < summary["upload_bytes_per_client"] < 400
    assert summary["download_bytes_per_client"] > 4 * nnz
    theta = load_file(str(out / "final_state.safetensors"))["theta"]
    assert theta.numel() == nnz and torch.isfinite(theta).all()
    hist = json.loads((out / "partition.json").read_text())["histogram"]
    assert sum(map(sum, hist)) == summary["train_examples"]

    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_accuracy"] == summary["final_accuracy"]
    assert ev["test_auc"] == summary["final_auc"] and ev["test_macro_f1"] == summary["final_macro_f1"]
    assert main(["report", str(out)]) == 0
    assert f"ROC-AUC: {summary['initial_auc']:.4f} zero-shot -> {summary['final_auc']:.4f}" in (
        capsys.readouterr().out)
    # the same run twice gives the same numbers (seeded everything)
    out2 = tmp_path / "run2"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out2)) == 0
    assert torch.equal(load_file(str(out2 / "final_state.safetensors"))["theta"], theta)


def test_one_model_in_memory_whatever_the_number_of_clients(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, monkeypatch):
    import fedmeerkat.runners.prepare as sim  # where the run loads model and task

    loads = []
    real = sim.load_model

    def counting(*a, **kw):
        loads.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(sim, "load_model", counting)
    for k in (2, 8):
        args = _args(tiny_model_dir, sentiment_csv, calib_txt, tmp_path / f"k{k}", "rounds=1")
        args = [a if not a.startswith("clients=") else f"clients={k}" for a in args]
        assert main(args) == 0
    assert len(loads) == 2  # one load per run, not per client


def test_dry_run_validates_without_loading(capsys, tiny_model_dir):
    assert main(["run", "--dry-run", f"model={tiny_model_dir}", "clients=3", "lr=2e-4"]) == 0
    out = capsys.readouterr().out
    assert f'model = "{tiny_model_dir}"' in out and "clients = 3" in out
    assert main(["run", "--dry-run", "model=/no/such/model"]) == 2  # a path must exist


@pytest.mark.parametrize("override,needle", [
    ("lrr=1", "unknown config key 'lrr' (did you mean 'lr'?)"),
    ("clients=0", "clients: must be >= 1"),
    ("partition=zipf", "partition: 'zipf' is not one of"),
    ("eps=abc", "eps: expected float"),
    ("task=local", "data_files: required"),
    ("reply_bound=0.5", "reply_bound: must be 0 (off) or >= 1"),
    ("reply_bound_action=drop", "reply_bound_action: 'drop' is not one of reject, clip"),
    ("min_clients=11", "min_clients: 11 exceeds the 10 clients planned per round"),
    ("round_retries=-1", "round_retries: must be >= 0"),
    ("client_sampling=size", "client_sampling: size draws clients_per_round of the clients"),
    ("client_sampling=sizes", "client_sampling: 'sizes' is not one of uniform, size"),
])
def test_bad_config_is_one_clear_line(override, needle, capsys):
    assert main(["run", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_size_sampling_of_several_clients_a_round_needs_uniform_weights(capsys):
    """Drawn by size and weighted by size, a large client would count twice."""
    assert main(["run", "client_sampling=size", "clients_per_round=3"]) == 2
    assert "needs weighting=uniform" in capsys.readouterr().err
    assert main(["run", "--dry-run", "client_sampling=size", "clients_per_round=3",
                 "weighting=uniform"]) == 0
    assert main(["run", "--dry-run", "client_sampling=size", "clients_per_round=1"]) == 0


def test_existing_run_folder_is_refused(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.jsonl").write_text("{}\n")
    assert main(["run", f"model={tiny_model_dir}", f"out={tmp_path / 'x'}", "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["calibration", "random", "task-gradient"])
def test_mask_command_writes_a_mask_that_a_run_accepts(
        kind, tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    # task-gradient is scored on the task's labelled training examples: the run's own task
    task = (["task=local", f"data_files={sentiment_csv}", "template={sentence} so it was",
             "label_words=[' bad', ' good']", "mask_examples=8"] if kind == "task-gradient" else [])
    assert main(["mask", f"model={tiny_model_dir}", f"calib_corpus={calib_txt}",
                 "calib_sequences=3", "calib_seq_len=24", "density=0.02", f"mask_kind={kind}",
                 *task, "--out", str(path)]) == 0
    assert f"mask ({kind})" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, f"mask={path}",
                      "rounds=1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mask_source"] == f"file {path}"
    assert summary["density"] == pytest.approx(0.02, rel=1e-3)


@pytest.mark.faults
def test_run_without_replies_stops_with_exit_3_and_resumes(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    # a deadline that has passed before the first client starts: no round gets a reply
    out = tmp_path / "cut"
    args = _args(tiny_model_dir, sentiment_csv, calib_txt, out, "rounds=2")
    assert main([*args, "round_timeout=1e-9", "round_retries=1"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedmeerkat: error: round 1: fewer than min_clients=1 usable "
                              "replies in 2 attempt(s)")
    assert f"continue with `fedmeerkat run --resume {out}`" in err[-1]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1] and lines[1]["failed"] is True
    assert [a["missing"] for a in lines[1]["attempts"]] == [[0, 1, 2, 3]] * 2
    assert not (out / "final_state.safetensors").exists()
    # resumed with no deadline it finishes, bit-identical to a run that never stalled
    assert main(["run", "--resume", str(out), "round_timeout=0", "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2] and not any(x.get("failed") for x in lines)
    clean = tmp_path / "clean"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, clean, "rounds=2")) == 0
    assert torch.equal(load_file(str(out / "final_state.safetensors"))["theta"],
                       load_file(str(clean / "final_state.safetensors"))["theta"])


def test_the_printout_says_how_many_clients_a_round_samples():
    from fedmeerkat.cli.main import _schedule

    s = {"rounds": 80, "clients": 5, "local_steps": 10}
    assert _schedule({**s, "clients_per_round": 1}) == "80 rounds x 1 of 5 clients x 10 steps"
    assert _schedule({**s, "clients_per_round": 5}) == "80 rounds x 5 clients x 10 steps"
    assert _schedule(s) == "80 rounds x 5 clients x 10 steps"  # a summary from before the key
    assert _schedule({**s, "clients_per_round": 1, "client_sampling": "size"}) == (
        "80 rounds x 1 of 5 clients drawn by size x 10 steps")
