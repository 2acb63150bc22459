"""Hostile input and crashes (docs/reliability.md): `pytest -m faults` runs them alone.

Crash safety: a real run killed with SIGKILL mid-round resumes to a final state bit-identical to
an uninterrupted run; damaged checkpoints fall back to the previous one; a half-written metrics
line is repaired. Bad input: one line on stderr, exit code 2, and no model load where the value
is known beforehand. No pickle on any loading path.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fedmeerkat
from fedmeerkat.cli.main import main
from fedmeerkat.models.tiny import save_tiny_llama
from fedmeerkat.runners.run_folder import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    MetricsLog,
    read_checkpoint,
)
from fedmeerkat.zo import SparseMask
from fedmeerkat.zo.mask import MaskFileError

pytestmark = pytest.mark.faults

REPO = Path(fedmeerkat.__file__).resolve().parent.parent


def _args(model, csv, calib, out, *extra):
    return ["run", f"model={model}", "task=local", f"data_files={csv}",
            "template={sentence} so it was", "label_words=[' bad', ' good']",
            f"calib_corpus={calib}", "calib_sequences=4", "calib_seq_len=32", "density=0.01",
            "clients=4", "rounds=4", "local_steps=2", "batch_size=4", "lr=0.01", "eval_every=2",
            "partition=dirichlet", "alpha=0.5", "downlink=scalars", "clients_per_round=3",
            f"out={out}", "--quiet", *extra]


def _metrics(run: Path) -> list[dict]:
    # no timing fields are written per round today; drop any that appear later
    return [{k: v for k, v in json.loads(x).items() if "time" not in k and "seconds" not in k}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _theta(run: Path) -> torch.Tensor:
    return load_file(str(run / "final_state.safetensors"))["theta"]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, FEDMEERKAT_CACHE=str(cache), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    return env


def _checkpoint_round(run: Path, name: str = CHECKPOINT) -> int:
    return int(read_checkpoint(run / name)[1]["server"]["round"])


# ---- crash safety ------------------------------------------------------------------------

def test_sigkill_mid_round_then_resume_is_bit_identical(
        tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path):
    """A real `fedmeerkat run` process is killed with SIGKILL while round 3 runs (rounds of
    many local steps, so the kill lands inside one), then resumed by another process."""
    slow = ("rounds=5", "local_steps=40", "threads=1")
    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, full, *slow)) == 0
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "fedmeerkat.cli.main",
           *_args(tiny_model_dir, sentiment_csv, calib_txt, cut, *slow)]
    proc = subprocess.Popen(cmd, env=_env(isolated_cache), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (cut / "metrics.jsonl").is_file() and len(MetricsLog(cut / "metrics.jsonl").read()) >= 3:
                break  # rounds 0, 1, 2 written: round 3 is running
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.2)  # inside round 3: its 3 clients x 40 steps take about 0.8 s or more
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "final_state.safetensors").exists()
    # killed inside round 3: rounds 0-2 recorded and checkpointed, round 3 not
    assert [r["round"] for r in MetricsLog(cut / "metrics.jsonl").read()] == [0, 1, 2]
    assert _checkpoint_round(cut) == 2

    res = subprocess.run([sys.executable, "-m", "fedmeerkat.cli.main", "run", "--resume",
                          str(cut), "--quiet"], env=_env(isolated_cache), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert torch.equal(_theta(full), _theta(cut))
    assert _metrics(full) == _metrics(cut)


@pytest.fixture()
def crashed(tiny_model_dir, sentiment_csv, calib_txt, isolated_cache, tmp_path, monkeypatch):
    """(uninterrupted run, a run interrupted after its round-3 checkpoint)."""
    import fedmeerkat.runners.run_folder as sim  # checkpoints are written there

    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, full)) == 0
    real = sim.save_checkpoint

    def crash_after_round_3(out, server, states, *rest):
        real(out, server, states, *rest)
        if server.round == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(sim, "save_checkpoint", crash_after_round_3)
    cut = tmp_path / "cut"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, cut)) == 130
    monkeypatch.setattr(sim, "save_checkpoint", real)
    assert _checkpoint_round(cut) == 3 and _checkpoint_round(cut, PREVIOUS_CHECKPOINT) == 2
    return full, cut


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: safetensors reads it, the checksum does not match
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,why", [(_truncate, "unreadable"),
                                        (_flip_last_byte, "fails its checksum"),
                                        (lambda p: p.unlink(), "is missing")])
def test_damaged_checkpoint_falls_back_to_the_previous_one(crashed, capsys, damage, why):
    full, cut = crashed
    damage(cut / CHECKPOINT)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "train_lo')  # an append cut short by the crash
    capsys.readouterr()
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if CHECKPOINT in ln]
    assert len(err) == 1 and why in err[0] and PREVIOUS_CHECKPOINT in err[0], err
    assert torch.equal(_theta(full), _theta(cut))
    assert _metrics(full) == _metrics(cut)


def test_no_sound_checkpoint_is_one_line_exit_2(crashed, capsys):
    _, cut = crashed
    _truncate(cut / CHECKPOINT)
    _flip_last_byte(cut / PREVIOUS_CHECKPOINT)
    capsys.readouterr()
    assert main(["run", "--resume", str(cut), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no sound checkpoint" in err[-1] and "fails its checksum" in err[-1]


def test_checkpoint_of_another_run_is_refused(crashed, tiny_model_dir, sentiment_csv, calib_txt,
                                              tmp_path, capsys, monkeypatch):
    import fedmeerkat.runners.run_folder as sim  # checkpoints are written there

    _, cut = crashed
    other = tmp_path / "other"  # another mask (density), same clients and rounds

    def stop(out, server, states, *rest):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "save_checkpoint", stop)
    main(_args(tiny_model_dir, sentiment_csv, calib_txt, other, "density=0.02"))
    monkeypatch.undo()
    (other / CHECKPOINT).write_bytes((cut / CHECKPOINT).read_bytes())
    capsys.readouterr()
    assert main(["run", "--resume", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "another trainable space or model" in err


def test_truncated_final_state_is_one_line(crashed, capsys):
    full, _ = crashed
    _truncate(full / "final_state.safetensors")
    capsys.readouterr()
    assert main(["eval", str(full)]) == 2
    assert "final_state.safetensors: unreadable" in _error_line(capsys.readouterr().err)


def test_trajectories_after_the_checkpoint_are_dropped(tmp_path):
    from fedmeerkat.runners.run_folder import drop_trajectories_after, save_trajectories

    for r in range(1, 6):
        save_trajectories(tmp_path, r, {"x": torch.zeros(2)})
    drop_trajectories_after(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "trajectories").iterdir()) == [
        f"round_{r:05d}.safetensors" for r in (1, 2, 3)]


def test_metrics_log_drops_only_a_partial_last_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"round": 0})
    log.append({"round": 1})
    with open(log.path, "a") as f:
        f.write('{"round": 2, "tr')
    assert log.read() == [{"round": 0}, {"round": 1}]
    log.path.write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        log.read()


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("override,needle", [
    ("task=nope", "task: unknown task 'nope'"),
    ("model=/no/such/model", "model: model folder not found"),
    ("model=not a model!", "is not a packaged model"),
    ("method=sgd", "method: 'sgd' is not one of"),
    ("partition=zipf", "partition: 'zipf' is not one of"),
    ("lr=inf", "lr: must be a finite number"),
    ("eps=nan", "eps: must be a finite number"),
    ("density=2", "density: must be <= 1"),
    ("local_steps=70000", "local_steps: 70000 exceeds 65535"),
    ("clients=4294967297", "clients: 4294967297 exceeds 4294967296"),
    ("rounds=4294967296", "rounds: 4294967296 exceeds 4294967295"),
    ("eligible=(", "eligible: '(' is not a valid regex"),
    ("calib_corpus=/no/such/corpus.txt", "calib_corpus: '/no/such/corpus.txt' is neither"),
])
def test_bad_value_fails_before_any_load_even_in_dry_run(override, needle, capsys, monkeypatch):
    import fedmeerkat.runners.prepare as sim  # where the run loads model and task

    def no_load(*a, **kw):
        raise AssertionError("loaded something for a value known to be bad beforehand")

    monkeypatch.setattr(sim, "load_model", no_load)
    monkeypatch.setattr(sim, "load_task", no_load)
    for extra in (["--dry-run"], ["--quiet"]):
        assert main(["run", override, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err


def test_vp_step_counts_are_held_to_the_wire_format(capsys):
    assert main(["run", "--dry-run", "method=meerkat-vp", "vp_calibration_steps=70000"]) == 2
    assert "vp_calibration_steps: 70000 exceeds 65535" in capsys.readouterr().err


def test_a_hub_id_passes_the_offline_checks(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["run", "--dry-run", "model=SomeOrg/some-model"]) == 0


def _mask_args(tmp_path, mask_path):
    return ["run", "--dry-run", f"mask={mask_path}", f"out={tmp_path / 'r'}"]


def _mask_file(path: Path, idx: torch.Tensor, shape=(4, 4)) -> Path:
    save_file({"idx::w": idx}, str(path), metadata={
        "format_version": "1", "names": json.dumps(["w"]), "shapes": json.dumps([list(shape)])})
    return path


@pytest.mark.parametrize("idx,needle", [
    ([1, 3, 2], "unsorted"),
    ([1, 3, 3], "repeated"),
    ([-1, 2], "outside 0..15"),
    ([2, 16], "outside 0..15"),
])
def test_bad_mask_indices_are_refused(tmp_path, capsys, idx, needle):
    path = _mask_file(tmp_path / "m.safetensors", torch.tensor(idx, dtype=torch.int64))
    with pytest.raises(MaskFileError, match=needle):
        SparseMask.load(path)
    assert main(_mask_args(tmp_path, path)) == 2  # the dry run reads the mask file too
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_truncated_mask_file_is_one_line(tmp_path, capsys):
    path = _mask_file(tmp_path / "m.safetensors", torch.tensor([1, 2, 5], dtype=torch.int64))
    _truncate(path)
    assert main(_mask_args(tmp_path, path)) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable mask file" in err and "\n" not in err


def test_mask_of_another_model_is_refused(tiny_model_dir, sentiment_csv, calib_txt,
                                          isolated_cache, tmp_path, capsys):
    other = save_tiny_llama(tmp_path / "other", vocab_words=("the film good bad".split()),
                            seed=1)
    path = tmp_path / "other-mask.safetensors"
    assert main(["mask", f"model={other}", f"calib_corpus={calib_txt}", "calib_sequences=2",
                 "calib_seq_len=24", "density=0.02", "mask_kind=random", "--out",
                 str(path)]) == 0
    capsys.readouterr()
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, tmp_path / "r",
                      f"mask={path}")) == 2
    assert "mask was computed for another model" in _error_line(capsys.readouterr().err)


def _local_run(model, files, calib, out, *extra):
    args = _args(model, "x", calib, out, *extra)
    return [a if not a.startswith("data_files=") else f"data_files={files}" for a in args]


@pytest.mark.parametrize("train,test,extra,needle", [
    ("text,label\nthe film,1\nbad film,0\n", None, (),
     "uses fields ['sentence'] that the data lacks"),
    ("sentence,y\nthe film,1\nbad film,0\n", None, (), "label column 'label' not found"),
    ("sentence,label\nthe film,good\nbad film,bad\nso so,meh\n", None, (),
     "3 classes ['bad', 'good', 'meh'] but 2 label words"),
    ("sentence,label\nthe film,1\nbad film,5\n", None, (), "has label 5, outside 0..1"),
    ("sentence,label\n" + "the film was good,1\nthe film was bad,0\n" * 20,
     "text,label\nthe film,1\n", (), "columns ['sentence'] of the template are missing"),
    ("sentence,label\n" + "the film was good,1\nthe film was bad,0\n" * 20, None,
     ("label_words=[' bad', ' good good']",), "label word ' good good' is 2 tokens"),
    ("sentence,label\n" + "the film was good,1\nthe film was bad,0\n" * 20, None,
     ("clients=50", "partition=iid"), "cannot give 50 clients"),
])
def test_bad_local_data_is_one_line_exit_2(tiny_model_dir, calib_txt, isolated_cache,
                                           tmp_path, capsys, train, test, extra, needle):
    (tmp_path / "train.csv").write_text(train)
    files = str(tmp_path / "train.csv")
    if test is not None:
        (tmp_path / "test.csv").write_text(test)
        files = f"train={tmp_path / 'train.csv'},test={tmp_path / 'test.csv'}"
    assert main(_local_run(tiny_model_dir, files, calib_txt, tmp_path / "r", *extra)) == 2
    assert needle in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()  # nothing ran: out= is free for the fixed command


def test_unreadable_data_file_is_one_line(tiny_model_dir, calib_txt, isolated_cache, tmp_path,
                                          capsys):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "the film", "label": 1}\n{"sentence": "bad fi\n')
    assert main(_local_run(tiny_model_dir, path, calib_txt, tmp_path / "r")) == 2
    assert "could not read data files" in _error_line(capsys.readouterr().err)


def _error_line(err: str) -> str:
    """The error is one line starting 'fedmeerkat:' (other lines are progress logs)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("fedmeerkat:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- run folders -------------------------------------------------------------------------

_CLAIM = """
import sys
from fedmeerkat.config import build_config
from fedmeerkat.runners.run_folder import open_run_folder
cfg = build_config({"model": "SomeOrg/m"})
sys.stdin.readline()  # start together
print("\\n".join(str(open_run_folder(cfg, False)[1]) for _ in range(25)), flush=True)
"""


def test_default_run_folders_never_collide_across_processes(tmp_path):
    """Three processes each open 25 default run folders at once (the same second)."""
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIM], cwd=tmp_path, text=True,
                              env={**{k: v for k, v in os.environ.items()
                                      if k != "HF_HUB_OFFLINE"}, "PYTHONPATH": str(REPO)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for _ in range(3)]
    try:
        time.sleep(0.5)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    folders = [f for o in outs for f in o]
    assert len(folders) == 75 and len(set(folders)) == 75
    assert len(list((tmp_path / "runs").iterdir())) == 75
    assert all((tmp_path / f / "config.toml").is_file() for f in folders)


# ---- no pickle ---------------------------------------------------------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                   "marshal"}


def _pickle_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in _PICKLE_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.Call):
            f = node.func
            name = ast.unparse(f)
            if name in ("torch.load", "np.load", "numpy.load", "pd.read_pickle",
                        "pandas.read_pickle", "torch.serialization.load"):
                found.append(name)
            for kw in node.keywords:
                bad = {"weights_only": False, "allow_pickle": True, "use_safetensors": False}
                if kw.arg in bad and isinstance(kw.value, ast.Constant) \
                        and kw.value.value is bad[kw.arg]:
                    found.append(f"{name}({kw.arg}={kw.value.value})")
            # a model's weights come from safetensors or GGUF, never a pickled .bin
            if isinstance(f, ast.Attribute) and f.attr == "from_pretrained" \
                    and "Model" in ast.unparse(f.value):
                kws = {kw.arg: kw.value for kw in node.keywords}
                safe = isinstance(kws.get("use_safetensors"), ast.Constant) and \
                    kws["use_safetensors"].value is True
                if not safe and "gguf_file" not in kws:
                    found.append(f"{name} without use_safetensors=True")
    return found


def test_the_scanner_sees_pickle():
    src = ("import pickle\nfrom joblib import load\nimport torch\ntorch.load('x')\n"
           "np.load('a', allow_pickle=True)\nAutoModelForCausalLM.from_pretrained('p')\n"
           "t.load(f, weights_only=False)\n")
    assert _pickle_uses(ast.parse(src)) == [
        "pickle", "joblib", "torch.load", "np.load", "np.load(allow_pickle=True)",
        "AutoModelForCausalLM.from_pretrained without use_safetensors=True",
        "t.load(weights_only=False)"]


def test_no_pickle_on_any_loading_path():
    root = Path(fedmeerkat.__file__).parent
    found = {str(p.relative_to(root)): u for p in sorted(root.rglob("*.py"))
             if (u := _pickle_uses(ast.parse(p.read_text())))}
    assert not found, found
