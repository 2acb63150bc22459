"""Real FLARE deployment on this machine: provisioned server and two sites as processes, mutual
TLS, the echo job through the admin API (~20 s, one deployment shared by the tests below).

Everything runs inside private user, network and PID namespaces (fedmeerkat.deploy.selftest):
nothing can leave the machine, and every process dies with the namespace whatever happens.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nvflare", reason="nvflare not installed (pip install nvflare==2.9.0)")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fedmeerkat.deploy import selftest  # noqa: E402  (after the skip: it needs nvflare)

pytestmark = pytest.mark.deploy
ROUNDS = 3


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    why = selftest.netns_available()
    if why:
        pytest.skip(f"no private namespaces for the deployment test ({why})")
    workdir = tmp_path_factory.mktemp("deploy") / "run"
    result = selftest.launch(workdir, ["--rounds", str(ROUNDS), "--intruder", "--late"],
                             timeout_s=150)
    assert result["returncode"] == 0, result.get("error") or result["output"]
    assert result["netns_pid"] == 1  # it really ran in its own PID namespace
    return result


def test_every_round_reaches_one_resident_trainer_per_site(deployment):
    assert deployment["job_status"] == "FINISHED:COMPLETED"
    rounds = deployment["echo"]["rounds"][:ROUNDS]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    pids: dict[str, set[int]] = {}
    for r in rounds:
        assert set(r["replies"]) == set(selftest.SITES)  # every site answered every round
        for site, reply in r["replies"].items():
            assert reply["site"] == site and reply["round"] == r["round"]
            assert reply["site_arg"] == selftest.SITES[site]  # the per-site argument arrived
            assert reply["count"] == r["round"] + 1  # same process state across rounds
            pids.setdefault(site, set()).add(reply["pid"])
    assert all(len(p) == 1 for p in pids.values()), pids  # one trainer PID per site, all rounds
    assert len({p for ps in pids.values() for p in ps}) == len(selftest.SITES)


def test_a_late_site_is_left_out_of_its_round_and_answers_the_next(deployment):
    late, after = deployment["echo"]["rounds"][ROUNDS:]
    others = set(selftest.SITES) - {selftest.LATE_SITE}
    assert set(late["replies"]) == others  # the deadline passed without the late site
    assert late["seconds"] < late["timeout_s"] + 0.5
    assert set(after["replies"]) == set(selftest.SITES)
    reply = after["replies"][selftest.LATE_SITE]
    # Its trainer did handle the late round (count), in the same process, and moved on.
    assert reply["round"] == ROUNDS + 1 and reply["count"] == ROUNDS + 2
    first = deployment["echo"]["rounds"][0]["replies"][selftest.LATE_SITE]
    assert reply["pid"] == first["pid"]


def test_kits_of_another_project_are_refused(deployment):
    assert deployment["connected"] == sorted(selftest.SITES)
    intruders = deployment["intruders"]
    # Both were up and trying for the whole job; neither ever registered.
    assert all(i["running"] for i in intruders.values()), intruders
    # Another project's kit as is: it cannot verify our server's certificate (other root CA).
    assert intruders["intruder"]["handshake_failures"], intruders["intruder"]


# ---- the real thing: Meerkat on the tiny model, deployed vs in process --------------------
DOWNLINKS = ("sparse-weights", "scalars")


def _base(root, tiny_model_dir):
    import random

    rng = random.Random(0)
    pos, neg = ["great", "good", "fun", "lovely"], ["terrible", "bad", "dull", "awful"]
    rows = ["sentence,label"] + [
        f"the film was {rng.choice(pos if i % 2 else neg)} and {rng.choice(pos if i % 2 else neg)},{i % 2}"
        for i in range(60)]
    (root / "r.csv").write_text("\n".join(rows) + "\n")
    (root / "c.txt").write_text((" ".join(["the film was a very good film and the actors were lovely"] * 3) + "\n") * 8)
    return [f"model={tiny_model_dir}", "task=local", f"data_files={root / 'r.csv'}",
            "template={sentence} It was", "label_words=[' good',' bad']",
            f"calib_corpus={root / 'c.txt'}", "calib_sequences=4", "calib_seq_len=16",
            "clients=3", "rounds=3", "local_steps=2", "batch_size=4", "lr=0.05", "eps=0.01",
            "density=0.05", "eval_every=1", "partition=iid"]


@pytest.fixture(scope="module")
def deployed_runs(tmp_path_factory, tiny_model_dir):
    """Prepared runs (one per downlink) run as FLARE jobs on one deployment, and the same
    configs run in process."""
    why = selftest.netns_available()
    if why:
        pytest.skip(f"no private namespaces for the deployment test ({why})")
    from fedmeerkat.config import load_config
    from fedmeerkat.deploy.meerkat import prepare_run
    from fedmeerkat.runners.simulation import run

    root = tmp_path_factory.mktemp("meerkat")
    base = _base(root, tiny_model_dir)
    runs = {d: prepare_run(load_config(None, [*base, f"downlink={d}", f"out={root / d}"]), quiet=True)
            for d in DOWNLINKS}
    result = selftest.launch(root / "deploy", ["--rounds", "1",
                                               "--runs", ",".join(str(p) for p in runs.values())],
                             timeout_s=240)
    assert result["returncode"] == 0, result.get("error") or result["output"]
    local = {d: Path(run(load_config(None, [*base, f"downlink={d}", f"mask={runs[d] / 'mask.safetensors'}",
                                           f"out={root / ('local-' + d)}"]), quiet=True)["out"])
             for d in DOWNLINKS}
    return runs, local, result


@pytest.mark.parametrize("downlink", DOWNLINKS)
def test_deployed_meerkat_is_bit_identical_to_the_in_process_run(deployed_runs, downlink):
    import json

    from safetensors.torch import load_file

    runs, local, result = deployed_runs
    assert result["runs"][str(runs[downlink])]["status"] == "FINISHED:COMPLETED"
    deployed = load_file(str(runs[downlink] / "final_state.safetensors"))["theta"]
    here = load_file(str(local[downlink] / "final_state.safetensors"))["theta"]
    assert torch.equal(deployed, here)
    assert not torch.equal(deployed, load_file(str(runs[downlink] / "initial_state.safetensors"))["theta"])
    read = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (runs[downlink], local[downlink])]
    keys = ("round", "train_loss", "test_accuracy", "bytes_up", "bytes_down", "bytes", "client_steps",
            "test_auc", "test_macro_f1", "test_best_shift_accuracy")  # the last three: from site logits
    assert read[0][0]["test_auc"] is not None and read[0][0]["test_macro_f1"] is not None
    assert [{k: r.get(k) for k in keys} for r in read[0]] == [{k: r.get(k) for k in keys} for r in read[1]]
    assert len(read[0]) == 4  # round 0 and three rounds
    summary = json.loads((runs[downlink] / "summary.json").read_text())
    assert summary["transport"] == "nvflare" and summary["rounds"] == 3
