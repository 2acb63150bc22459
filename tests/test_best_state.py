"""best_state.safetensors: a run keeps the trained values of its best validation round (the
round summary.json's best_val_round names), `eval --best` and `export --best` read them, a
resumed run rewrites the file when a crash came between that round's checkpoint and it, and a
stale file is refused rather than read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmeerkat.cli.main import main
from fedmeerkat.options import InputError
from fedmeerkat.runners.evaluation import best_round
from fedmeerkat.runners.run_folder import BEST_STATE, FINAL_STATE, MetricsLog, load_run_state

# an lr at which the tiny model's 16 validation examples move between rounds: the best round
# is 1 of 5 (checked below: a best round that is the last would prove little)
HOT = ["lr=0.1", "rounds=5", "eval_every=1", "val_fraction=0.25"]


def _args(model: str, csv: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["run", f"model={model}", "task=local", f"data_files={csv}",
            "template={sentence} so it was", "label_words=[' bad', ' good']",
            f"calib_corpus={calib}", "calib_sequences=4", "calib_seq_len=32", "density=0.01",
            "clients=2", "local_steps=2", "batch_size=4", "partition=iid", f"out={out}",
            "--quiet", *extra]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture()
def hot_run(tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    out = tmp_path / "hot"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, *HOT)) == 0
    # the printout names the command, since the best round is not the last
    assert f"(its model: fedmeerkat export {out} --best)" in capsys.readouterr().out
    return out


def test_the_best_state_is_the_best_validation_rounds_model(
        hot_run, tiny_model_dir, sentiment_csv, calib_txt, tmp_path, capsys):
    best = _summary(hot_run)["best_val_round"]
    assert 0 < best < 5, best  # the run drifted after its best round (see HOT)
    kept = load_file(str(hot_run / BEST_STATE))["theta"]
    # the same run stopped at the best round ends exactly where the kept state is
    short = tmp_path / "short"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, short,
                      *[a for a in HOT if not a.startswith("rounds=")], f"rounds={best}")) == 0
    assert torch.equal(kept, load_file(str(short / FINAL_STATE))["theta"])
    assert not torch.equal(kept, load_file(str(hot_run / FINAL_STATE))["theta"])

    capsys.readouterr()
    assert main(["eval", str(hot_run), "--best"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert main(["eval", str(short)]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == scored["test_accuracy"]
    assert scored["weights"].endswith("(best validation round)")

    assert main(["export", str(hot_run), "--out", str(tmp_path / "exp"), "--best"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exp" / "delta.safetensors"), framework="pt") as f:
        assert f.metadata()["rounds"] == str(best)

    from fedmeerkat.report.table import run_report

    assert f"best validation round: {best} (validation " in run_report(hot_run)
    assert "its model: best_state.safetensors (export --best)" in run_report(hot_run)


def test_a_resumed_run_writes_a_best_state_a_crash_left_unwritten(
        hot_run, tiny_model_dir, sentiment_csv, calib_txt, tmp_path):
    best = _summary(hot_run)["best_val_round"]
    kept = load_file(str(hot_run / BEST_STATE))["theta"]
    short = tmp_path / "short"  # the hot run up to its best round, which is then its last
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, short,
                      *[a for a in HOT if not a.startswith("rounds=")], f"rounds={best}")) == 0
    (short / BEST_STATE).unlink()  # as if the process died between the checkpoint and it
    assert main(["run", "--resume", str(short), f"rounds={best + 1}", "--quiet"]) == 0
    assert torch.equal(load_file(str(short / BEST_STATE))["theta"], kept)

    # a best round behind the checkpoint cannot be rebuilt on resume: reading says so rather
    # than hand over another round's values
    (short / BEST_STATE).unlink()
    assert main(["run", "--resume", str(short), f"rounds={best + 2}", "--quiet"]) == 0
    with pytest.raises(FileNotFoundError, match="best_state"):
        load_run_state(short, "best")


def test_a_stale_best_state_is_refused(hot_run, capsys):
    best = _summary(hot_run)["best_val_round"]
    theta = load_file(str(hot_run / BEST_STATE))["theta"]
    save_file({"theta": theta}, str(hot_run / BEST_STATE), metadata={"round": str(best + 1)})
    with pytest.raises(InputError, match=f"best validation round is {best}"):
        load_run_state(hot_run, "best")
    assert best_round(MetricsLog(hot_run / "metrics.jsonl").read())["best_val_round"] == best


def test_no_validation_split_no_best_state(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, capsys):
    out = tmp_path / "noval"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out, "lr=0.05", "rounds=1",
                      "val_fraction=0")) == 0
    assert not (out / BEST_STATE).exists()
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "exp"), "--best"]) == 2
    err = capsys.readouterr().err
    assert "best_state" in err and "val_fraction=0" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--best"]) == 2

    off = tmp_path / "off"  # validation scored, but the state not kept
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, off, "lr=0.05", "rounds=1",
                      "keep_best=false")) == 0
    assert "best_val_round" in _summary(off) and not (off / BEST_STATE).exists()
    with pytest.raises(FileNotFoundError, match="keep_best=false"):
        load_run_state(off, "best")


def test_a_tie_keeps_the_earliest_round_in_the_file_as_in_the_summary():
    """The file is written as rounds arrive (Session._consider_best), the summary picks over
    all of them afterwards (best_round): on a tie both must name the same, earliest, round."""
    from types import SimpleNamespace

    from fedmeerkat.runners.session import Session

    vals = [0.70, 0.80, 0.75, 0.80, 0.80]  # rounds 1, 3 and 4 tie at the best
    records = [{"round": r, "test_accuracy": 0.5, "val_auc": v} for r, v in enumerate(vals)]
    seen = SimpleNamespace(cfg=SimpleNamespace(keep_best=True), best=None, best_due=False)
    written = []
    for rec in records:
        Session._consider_best(seen, rec["round"], rec)  # type: ignore[arg-type]
        if seen.best_due:
            written.append(seen.best[0])
            seen.best_due = False
    assert written == [0, 1] and best_round(records)["best_val_round"] == 1
