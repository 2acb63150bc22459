"""Real FLARE deployment on this machine: provisioned server and two sites as processes, mutual
TLS, the echo job and Meerkat jobs through the admin API, then a restart of every process and
a resumed Meerkat job (one deployment shared by the tests below, ~2 min on 2 cores).

Everything runs inside private user, network and PID namespaces (fedmeerkat.deploy.selftest):
nothing can leave the machine, and every process dies with the namespace whatever happens.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nvflare", reason="nvflare not installed (pip install nvflare==2.9.0)")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fedmeerkat.deploy import selftest  # noqa: E402  (after the skip: it needs nvflare)

pytestmark = pytest.mark.deploy
ROUNDS = 3


@pytest.fixture(scope="module")
def deployment(deployed_runs):
    return deployed_runs[2]


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
FIRST, LAST = 2, 4  # rounds before everything is stopped, rounds after the restart
RESTARTED = "scalars"  # the downlink whose run is stopped and resumed (the other runs through)
# a run whose site-2 trainer is killed once round 1 is recorded: rounds close after
# round_timeout without its client, the job finishes, and a resumed job brings it back
KILL = {"site": "site-2", "client": "2", "after_round": 1, "rounds": 3, "resume_to": 5,
        "round_timeout": 5}
# a ZO variant (several directions a step, one-sided estimates) deployed: still seeds and
# scalars only, so still bit-identical to the in-process run
# (the per-example one: two directions, each on two of the batch's four examples, through the
# model's forward hooks at every site)
VARIANTS = {"variant": ["perturbations=3", "zo_estimator=one-sided", "downlink=scalars"],
            "variant-per-example": ["perturbations=2", "zo_estimator=per-example",
                                    "downlink=scalars"]}
# differentially private scalars: the noise's generator must stay at the sites; two of the
# three sites a round, so each site's sigma is solved for the rounds its seeded draw plans
# (seed 1: its draw runs sites 0 and 1 for three rounds each, site 2 for two; seed 0 happens
# to draw sites 0 and 1 in all four rounds)
DP = ["dp_clip=1.0", "dp_epsilon=4", "clients_per_round=2", "downlink=scalars", "seed=1"]


@pytest.fixture(scope="module")
def deployed_runs(tmp_path_factory, tiny_model_dir):
    """Prepared runs (one per downlink) run as FLARE jobs: the sparse-weights one for LAST
    rounds, the scalars one for FIRST rounds; then every process stops, the server and sites
    start again as new processes and resume the scalars run to LAST rounds (the in-process
    resume tests in test_deploy_resume.py cover both downlinks and a server crash mid-round).
    Beside them, the same configs run in process for LAST rounds."""
    why = selftest.netns_available()
    if why:
        pytest.skip(f"no private namespaces for the deployment test ({why})")
    from deploy_config import base_overrides

    from fedmeerkat.config import load_config
    from fedmeerkat.deploy.meerkat import prepare_run
    from fedmeerkat.runners.simulation import run

    root = tmp_path_factory.mktemp("meerkat")
    base = base_overrides(root, tiny_model_dir)
    runs = {d: prepare_run(load_config(None, [*base, f"downlink={d}", f"out={root / d}",
                                              f"rounds={FIRST if d == RESTARTED else LAST}"]),
                           quiet=True)
            for d in DOWNLINKS}
    for name, variant in VARIANTS.items():
        runs[name] = prepare_run(load_config(None, [*base, *variant, f"out={root / name}",
                                                    f"rounds={LAST}"]), quiet=True)
    runs["dp"] = prepare_run(load_config(None, [*base, *DP, f"out={root / 'dp'}",
                                                f"rounds={LAST}"]), quiet=True)
    killed = prepare_run(load_config(None, [*base, "downlink=scalars", f"out={root / 'killed'}",
                                            f"rounds={KILL['rounds']}",
                                            f"round_timeout={KILL['round_timeout']}"]), quiet=True)
    # one deployment for every test here: the echo job (with a late round, intruders trying to
    # join), then the Meerkat runs, then the restart
    result = selftest.launch(root / "deploy", ["--rounds", str(ROUNDS), "--intruder", "--late",
                                               "--resume-to", str(LAST),
                                               "--runs", ",".join(str(p) for p in runs.values()),
                                               "--resume-runs", str(runs[RESTARTED]),
                                               "--kill", json.dumps({
                                                   "run": str(killed), "site": KILL["site"],
                                                   "after_round": KILL["after_round"],
                                                   "resume_to": KILL["resume_to"]})],
                             timeout_s=480)
    assert result["returncode"] == 0, result.get("error") or result["output"]
    assert result["netns_pid"] == 1  # it really ran in its own PID namespace
    local = {d: Path(run(load_config(None, [*base, f"rounds={LAST}", f"downlink={d}",
                                           f"mask={runs[d] / 'mask.safetensors'}",
                                           f"out={root / ('local-' + d)}"]), quiet=True)["out"])
             for d in DOWNLINKS}
    for name, variant in VARIANTS.items():
        local[name] = Path(run(load_config(None, [
            *base, *variant, f"rounds={LAST}", f"mask={runs[name] / 'mask.safetensors'}",
            f"out={root / ('local-' + name)}"]), quiet=True)["out"])
    return runs, local, result, killed


def test_a_deployed_private_run_keeps_the_noise_secret_at_the_sites(deployed_runs):
    """The server's run folder (checkpoints, metrics, summary) never holds a client's secret
    generator; the sites' state folders do. With two of three sites a round, each site spends
    its whole budget and no more over the rounds it was drawn for (its sigma solved for them)
    and a site spends nothing in a round it sits out."""
    from safetensors import safe_open

    runs, _, result, _ = deployed_runs
    run = runs["dp"]
    assert result["runs"][str(run)]["status"] == "FINISHED:COMPLETED"
    server_files = [p for p in run.rglob("*") if p.is_file() and "site_state" not in p.parts]
    assert server_files and not any(b"dp_rng" in p.read_bytes() for p in server_files)
    site_files = sorted((run / "site_state").rglob("*.safetensors"))
    assert site_files
    for f in site_files:
        with safe_open(str(f), framework="pt") as g:
            assert any(k.endswith(".extra.dp_rng") for k in g.keys())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["client_steps"]) == 2 for r in lines[1:])
    spent = {k: 0.0 for k in ("0", "1", "2")}
    for r in lines[1:]:
        for k, eps in r["dp_epsilon"].items():
            assert eps >= spent[k] and (eps > spent[k]) == (k in r["client_steps"]), r
            spent[k] = eps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dp"]["epsilon_spent"] == pytest.approx(spent)
    assert all(3.99 < e <= 4.0 for e in spent.values()), spent
    sigmas = summary["dp"]["noise_multiplier_per_client"]
    ran = {k: sum(r["client_steps"].get(k, 0) for r in lines[1:]) for k in spent}
    assert len(set(ran.values())) > 1  # the draw gives the sites different step counts
    assert all((sigmas[a] < sigmas[b]) == (ran[a] < ran[b]) for a in ran for b in ran
               if ran[a] != ran[b])


@pytest.mark.parametrize("name,seeds", [("variant", 2 * 3), ("variant-per-example", 2 * 2)])
def test_a_deployed_zo_variant_is_bit_identical_to_the_in_process_run(deployed_runs, name, seeds):
    from safetensors.torch import load_file

    runs, local, result, _ = deployed_runs
    assert result["runs"][str(runs[name])]["status"] == "FINISHED:COMPLETED"
    deployed = load_file(str(runs[name] / "final_state.safetensors"))["theta"]
    assert torch.equal(deployed, load_file(str(local[name] / "final_state.safetensors"))["theta"])
    assert not torch.equal(deployed, load_file(str(runs[name] / "initial_state.safetensors"))["theta"])
    read = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (runs[name], local[name])]
    keys = ("round", "train_loss", "test_auc", "bytes_up", "client_steps")
    assert [{k: r.get(k) for k in keys} for r in read[0]] == [{k: r.get(k) for k in keys} for r in read[1]]
    assert all(v == seeds for r in read[0][1:] for v in r["client_steps"].values())


@pytest.mark.parametrize("downlink", DOWNLINKS)
def test_deployed_meerkat_is_bit_identical_to_the_in_process_run(deployed_runs, downlink):
    """Also after a full stop and restart (scalars: FIRST rounds, then resumed to LAST)."""
    from safetensors.torch import load_file

    runs, local, result, _ = deployed_runs
    assert result["runs"][str(runs[downlink])]["status"] == "FINISHED:COMPLETED"
    if downlink == RESTARTED:
        assert result["resumed"][str(runs[downlink])]["status"] == "FINISHED:COMPLETED"
        # the FLARE server and sites that resumed it are new processes
        assert set(result["resumed"]["pids"].values()).isdisjoint(result["pids"].values())
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
    assert [r["round"] for r in read[0]] == list(range(LAST + 1))
    summary = json.loads((runs[downlink] / "summary.json").read_text())
    assert summary["transport"] == "nvflare" and summary["rounds"] == LAST
    # one resident trainer per site: its PID never changes within a job (every round has a
    # reply from every site); the restart brought new ones
    pids = {s: [r["site_pids"][s] for r in read[0][1:]] for s in selftest.MEERKAT_SITES}
    jobs = [(0, FIRST), (FIRST, LAST)] if downlink == RESTARTED else [(0, LAST)]
    for site, seen in pids.items():
        assert len(seen) == LAST, (site, seen)
        per_job = [set(seen[a:b]) for a, b in jobs]
        assert all(len(p) == 1 for p in per_job), (site, seen)
        assert len(set.union(*per_job)) == len(jobs), (site, seen)
    assert len({p for seen in pids.values() for p in seen}) == len(pids) * len(jobs)


def test_a_killed_site_trainer_is_left_out_then_rejoins_on_resume_and_catches_up(deployed_runs):
    """FLARE never relaunches a launch_once trainer within its job (docs/deploy.md): the run
    finishes without that site's client, and the next job (--resume) brings it back."""
    _, _, result, killed = deployed_runs
    k = result["killed"]
    assert k["killed"]["status"] == "FINISHED:COMPLETED", k
    assert k["rejoined"]["status"] == "FINISHED:COMPLETED", k
    records = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(KILL["resume_to"] + 1))
    client, after = KILL["client"], KILL["after_round"]
    before = records[1:after + 1]
    assert all(client in r["bytes"] and r["site_pids"][KILL["site"]] == k["killed_pid"]
               for r in before)
    # the round in flight when it died may still have its reply; every later round of the
    # job closes at round_timeout without it, and the others go on
    gone = records[after + 2:KILL["rounds"] + 1]
    assert gone and all(int(client) in r["missing"] and client not in r["bytes"] for r in gone)
    assert all(len(r["bytes"]) == 2 and r["train_loss"] is not None for r in gone)
    assert all(KILL["site"] not in r["site_pids"] for r in gone)
    back = records[KILL["rounds"] + 1:]
    assert back and all(client in r["bytes"] and not r.get("missing") for r in back)
    assert all(r["site_pids"][KILL["site"]] != k["killed_pid"] for r in back)  # a new trainer
    # it caught up: the first plan after its absence brought the aggregates it missed
    missed = len([r for r in records[after + 1:KILL["rounds"] + 1] if client not in r["bytes"]])
    assert back[0]["sync"][client] in (f"scalars:{missed + 1}", "vector"), back[0]["sync"]
