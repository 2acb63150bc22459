"""Real FLARE deployment on this machine: provisioned server and two sites as processes, mutual
TLS, the echo job through the admin API (~20 s, one deployment shared by the tests below).

Everything runs inside private user, network and PID namespaces (fedmeerkat.deploy.selftest):
nothing can leave the machine, and every process dies with the namespace whatever happens.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nvflare", reason="nvflare not installed (pip install nvflare==2.9.0)")

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
