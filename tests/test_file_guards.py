"""Issue 21: bad files and folders give one line and exit code 2, never a traceback: space and
mask files with impossible shapes, a checkpoint whose version byte was changed, a disk that
fills during a checkpoint write, and a run folder that another process is writing."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fedmeerkat.runners.run_folder as rf
from fedmeerkat.cli.main import main
from fedmeerkat.federated import FedSettings, MeerkatServer
from fedmeerkat.options import InputError
from fedmeerkat.runners.run_folder import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    CheckpointError,
    RunFolder,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from fedmeerkat.zo import SparseMask
from fedmeerkat.zo.dense import DENSE_FORMAT, DenseSpace
from tests.test_cli import _args

pytestmark = pytest.mark.faults


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert isinstance(e.value, InputError) and "\n" not in str(e.value), e.value
    return str(e.value)


# ---- space and mask files ----------------------------------------------------------------

def _dense_file(path: Path, **meta: str) -> Path:
    base = {"format_version": DENSE_FORMAT, "names": json.dumps(["a", "b"]),
            "shapes": json.dumps([[2, 3], [4]])}
    base.update(meta)
    save_file({"nnz": torch.tensor([10])}, str(path),
              metadata={k: v for k, v in base.items() if v is not None})
    return path


@pytest.mark.parametrize("meta,needle", [
    ({"names": None}, "names"),
    ({"shapes": None}, "shapes"),
    ({"shapes": "[[2, 3], [4"}, "shapes"),
    ({"names": '{"a": 1}'}, "names"),
    ({"shapes": json.dumps([[2, 3]])}, "2 names"),
    ({"shapes": json.dumps([[2 ** 70], [4]])}, "no tensor shape"),
    ({"shapes": json.dumps([[2 ** 40, 2 ** 40], [4]])}, "no tensor shape"),
    ({"shapes": json.dumps([[-1, 3], [4]])}, "no tensor shape"),
    ({"shapes": json.dumps([[2.5], [4]])}, "no tensor shape"),
])
def test_bad_dense_space_file_is_one_line(tmp_path, meta, needle):
    path = _dense_file(tmp_path / "space.safetensors", **meta)
    with pytest.raises(InputError) as e:
        DenseSpace.load(path)
    assert needle in _one_line(e) and str(path) in str(e.value)


def test_sound_dense_space_file_loads(tmp_path):
    space = DenseSpace.load(_dense_file(tmp_path / "space.safetensors"))
    assert space.names == ["a", "b"] and space.shapes == [(2, 3), (4,)] and space.nnz == 10


@pytest.mark.parametrize("shape", [(2 ** 70,), (2 ** 40, 2 ** 40), (-4, 4)])
def test_mask_of_an_impossible_shape_is_one_line(tmp_path, capsys, shape):
    path = tmp_path / "m.safetensors"
    save_file({"idx::w": torch.tensor([1, 2])}, str(path), metadata={
        "format_version": "1", "names": json.dumps(["w"]), "shapes": json.dumps([list(shape)])})
    with pytest.raises(InputError) as e:
        SparseMask.load(path)
    assert "no tensor shape" in _one_line(e)
    assert main(["run", "--dry-run", f"mask={path}", f"out={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tensor shape" in err and "\n" not in err and "Traceback" not in err


# ---- checkpoints -------------------------------------------------------------------------

def _server(value: float = 0.0) -> MeerkatServer:
    settings = FedSettings(local_steps=1, lr=0.1, eps=1e-3, batch_size=1, seed=0)
    return MeerkatServer(settings, torch.full((8,), value), [1, 1])


def _two_checkpoints(out: Path) -> None:
    """checkpoint.prev holds theta 1, checkpoint theta 2 (space digest "s")."""
    save_checkpoint(out, _server(1.0), [], "s")
    save_checkpoint(out, _server(2.0), [], "s")


def test_a_checkpoint_version_changed_to_2_is_not_loaded_unverified(tmp_path):
    """One bit turns version "3" into "2"; with the tensors damaged too, the file must fail
    its checks (and the previous checkpoint be used), not load unverified."""
    _two_checkpoints(tmp_path)
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    at = data.index(b'"version":"3"') + len(b'"version":"')
    data[at] ^= 0x01  # "3" -> "2"
    data[-1] ^= 0x40  # and a tensor byte
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="version '2'"):
        read_checkpoint(path, "s")
    server, logs = _server(), []
    load_checkpoint(tmp_path, server, [], "s", log=logs.append)
    assert torch.equal(server.theta, torch.full((8,), 1.0))  # the previous checkpoint
    assert len(logs) == 1 and "version '2'" in logs[0] and PREVIOUS_CHECKPOINT in logs[0]


def test_disk_full_during_a_checkpoint_write_keeps_the_last_one(tmp_path, monkeypatch):
    _two_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a part was written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rf, "save_file", full)
    with pytest.raises(InputError) as e:
        save_checkpoint(tmp_path, _server(3.0), [], "s")
    assert "No space left on device" in _one_line(e) and CHECKPOINT in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left


def test_disk_full_in_a_run_is_one_line_exit_2(tiny_model_dir, sentiment_csv, calib_txt,
                                               isolated_cache, tmp_path, monkeypatch, capsys):
    real, calls = rf.save_file, []

    def full_on_round_2(tensors, filename, metadata=None):
        if filename.endswith(CHECKPOINT + ".tmp"):
            calls.append(filename)
            if len(calls) == 3:  # round 0's and round 1's checkpoints fitted
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(rf, "save_file", full_on_round_2)
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fedmeerkat:")]
    assert "Traceback" not in err and len(lines) == 1 and "No space left" in lines[0], err
    assert int(read_checkpoint(out / CHECKPOINT)[1]["server"]["round"]) == 1


# ---- the run folder's lock ---------------------------------------------------------------

def test_a_run_folder_has_one_writer_at_a_time(tmp_path):
    folder = RunFolder(tmp_path)
    with folder.locked():
        with pytest.raises(InputError) as e, RunFolder(tmp_path).locked():
            pass  # flock holds per open file description: a second open conflicts
        assert str(tmp_path) in _one_line(e) and "in use" in str(e.value)
    with RunFolder(tmp_path).locked():  # released when the first writer ends
        pass


def test_resume_while_the_run_is_being_written_is_refused(tiny_model_dir, sentiment_csv,
                                                          calib_txt, isolated_cache, tmp_path,
                                                          capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sentiment_csv, calib_txt, out)) == 0
    capsys.readouterr()
    before = (out / CHECKPOINT).read_bytes()
    with RunFolder(out).locked():  # as a `fedmeerkat run` writing it holds it
        assert main(["run", "--resume", str(out), "rounds=4", "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fedmeerkat:")]
    assert "Traceback" not in err and len(lines) == 1 and "in use" in lines[0], err
    assert (out / CHECKPOINT).read_bytes() == before
    assert main(["run", "--resume", str(out), "rounds=4", "--quiet"]) == 0
