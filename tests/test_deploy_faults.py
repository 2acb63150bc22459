"""Hostile sites on the deployed path (`pytest -m faults`): `serve()` driven by a fake FLARE
that calls real `site()` handlers in process (as test_deploy_resume.py does), one site
misbehaving. Every hostile train or evaluation reply leaves the run bit-identical to the run in
which that reply was simply lost, with the reason in metrics.jsonl; a bad hello stops the run
before round 1 with one line naming the site. The last three tests share one deployment of real
FLARE processes (mutual TLS, private namespaces) whose sites are hostile (deploy_hostile.py):
site-2 in train rounds, site-1 (the majority host and the evaluating site) in train rounds and
evaluations, and, in a second job, site-2's hello."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_config import base_overrides
from safetensors.torch import load_file

from fedmeerkat.deploy.framing import REPLY_HEAD, pack_reply, unpack_reply
from fedmeerkat.deploy.meerkat import site_args
from fedmeerkat.deploy.serve import SitesEvaluator, serve
from fedmeerkat.deploy.site import site
from fedmeerkat.federated import ClientReply
from tests.test_validation import REASONS, _corrupt

pytestmark = pytest.mark.faults

# site-1 hosts a majority of the clients; with three sites the reply bound has a median
SITES = {"site-1": [0, 1, 2], "site-2": [3], "site-3": [4]}
ROUNDS, AT = 3, 2  # the hostile site misbehaves in round AT (train replies)
VICTIM = 1  # the client of site-1 whose reply is hostile in the per-client kinds
LOST = object()  # an edit's answer: the site's reply never arrived
KEYS = ("round", "train_loss", "client_steps", "sync", "test_accuracy", "test_loss",
        "predicted_share", "test_auc", "test_macro_f1", "test_best_shift_accuracy")


class Flare:
    """`exchange` as the FLARE transport has it, calling the site handlers in process;
    `edit(tag, at, site, reply)` may change (or, returning LOST, drop) what a site answered.
    `at` is the round of a train exchange, the round evaluated for an evaluation (round 0 the
    initial model), 0 for the hello."""

    def __init__(self, handlers, edit=None):
        self.handlers, self.edit = handlers, edit or (lambda tag, at, s, reply: reply)
        self.evaluations, self.timeouts = 0, []

    def exchange(self, round_idx, payloads, timeout_s=None):
        tag = next(iter(payloads.values()))[:1]
        at = round_idx
        if tag == b"E":
            at, self.evaluations = self.evaluations, self.evaluations + 1
        self.timeouts.append((tag, timeout_s))
        got = {}
        for s, blob in payloads.items():
            reply = self.edit(tag, at, s, self.handlers[s](blob))
            if reply is not LOST:
                got[s] = reply
        return got


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    from fedmeerkat.config import load_config
    from fedmeerkat.deploy.meerkat import prepare_run

    root = tmp_path_factory.mktemp("hostile")
    cfg = load_config(None, [*base_overrides(root, tiny_model_dir, rounds=ROUNDS), "clients=5",
                             "local_steps=3", "downlink=scalars", "round_timeout=600",
                             f"out={root / 'run'}"])
    return prepare_run(cfg, quiet=True)


def handlers(run_dir: Path) -> dict:
    return {s: site(s, a) for s, a in site_args(run_dir, SITES).items()}


def read(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def theta(run_dir: Path) -> torch.Tensor:
    return load_file(str(run_dir / "final_state.safetensors"))["theta"]


def deployed(prepared: Path, dest: Path, edit=None) -> tuple[Path, Flare]:
    run_dir = Path(shutil.copytree(prepared, dest))
    flare = Flare(handlers(run_dir), edit)
    serve(flare, str(run_dir), SITES)
    return run_dir, flare


@pytest.fixture(scope="module")
def lost(prepared, tmp_path_factory):
    """The reference runs, each made once when first asked for: "clean" (nothing lost),
    "client" (client VICTIM's reply lost in round AT), "site" (site-1's whole reply lost in
    round AT), "evaluation" (the evaluation of round ROUNDS lost)."""
    root, made = tmp_path_factory.mktemp("lost"), {}

    def drop_item(tag, at, s, reply):
        if tag == b"T" and at == AT and s == "site-1":
            return edit_items(reply, lambda items: items.pop(VICTIM))
        return reply

    edits = {
        "clean": None, "client": drop_item,
        "site": lambda tag, at, s, reply: LOST if (
            tag == b"T" and at == AT and s == "site-1") else reply,
        "evaluation": lambda tag, at, s, reply: LOST if (
            tag == b"E" and at == ROUNDS) else reply,
    }

    def get(name: str) -> Path:
        if name not in made:
            made[name] = deployed(prepared, root / name, edits[name])[0]
        return made[name]

    return get


def edit_items(reply: bytes, change) -> bytes:
    """site reply with `change(items)` applied to its client -> reply bytes."""
    pid, compute_s, forward_s, items = unpack_reply(reply)
    change(items)
    return pack_reply(pid, compute_s, forward_s, items)


def assert_same_run(a: Path, b: Path) -> None:
    assert torch.equal(theta(a), theta(b))
    assert [{k: r.get(k) for k in KEYS} for r in read(a)] == [{k: r.get(k) for k in KEYS}
                                                              for r in read(b)]


# ---- train replies -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(REASONS) + ["unknown-id"])
def test_a_hostile_reply_inside_a_sites_payload_is_as_if_lost(prepared, lost, tmp_path, kind):
    """Each hostile kind of the in-process suite (test_validation.py), as client VICTIM's
    reply inside site-1's payload: screened by the same path, the other two clients kept."""
    nnz = int(load_file(str(prepared / "initial_state.safetensors"))["theta"].numel())

    def hostile(tag, at, s, reply):
        if tag == b"T" and at == AT and s == "site-1":
            return edit_items(reply, lambda items: _corrupt(kind, items[VICTIM], items, VICTIM,
                                                            nnz))
        return reply

    run_dir, _ = deployed(prepared, tmp_path / "run", hostile)
    assert_same_run(run_dir, lost("client"))
    rec = read(run_dir)[AT]
    if kind == "unknown-id":  # answered for a client it does not host: dropped at the site
        assert rec["missing"] == [VICTIM] and "rejected" not in rec
        assert "answered for clients [9] it does not host" in rec["site_rejected"]["site-1"]
    else:
        assert list(rec["rejected"]) == [str(VICTIM)] and REASONS[kind] in rec["rejected"]["1"]
    assert sorted(rec["client_steps"]) == ["0", "2", "3", "4"]
    assert not torch.equal(theta(run_dir), theta(lost("clean")))  # something was left out


def _duplicate(reply: bytes) -> bytes:
    """site-1's payload naming client 0 twice, with different replies."""
    pid, compute_s, forward_s, items = unpack_reply(reply)
    other = ClientReply.from_bytes(items[0])
    other.scalars = [g + 1.0 for g in other.scalars]
    extra = other.to_bytes()
    body = b"".join(struct.pack("<II", k, len(b)) + b for k, b in [*items.items(), (0, extra)])
    return b"T" + REPLY_HEAD.pack(pid, compute_s, forward_s) + struct.pack(
        "<H", len(items) + 1) + body


def _huge(items: dict[int, bytes]) -> None:
    for k, blob in items.items():
        r = ClientReply.from_bytes(blob)
        items[k] = ClientReply(r.round, k, [1e30] * len(r.scalars), r.num_samples,
                               r.train_loss).to_bytes()


# kind -> (site-1's whole reply in round AT, reasons: site_rejected note or the clients'
# rejections)
SITE_FAULTS = {
    "int": (lambda b: 7, "not bytes (int)"),
    "none": (lambda b: None, "not bytes (NoneType)"),
    "dict": (lambda b: {"blob": b}, "not bytes (dict)"),
    "str": (lambda b: b.decode("latin-1"), "not bytes (str)"),
    "empty": (lambda b: b"", "not a train reply"),
    "wrong-tag": (lambda b: b"E" + b[1:], "not a train reply"),
    "garbage": (lambda b: b"T" + b"\xff" * 40, "truncated"),
    "truncated": (lambda b: b[:-5], "truncated"),
    "trailing": (lambda b: b + b"\0\0", "2 trailing bytes"),
    "duplicate": (_duplicate, "client 0 appears twice"),
    "majority-1e30": (lambda b: edit_items(b, _huge), "exceeds"),
}


@pytest.mark.parametrize("kind", list(SITE_FAULTS))
def test_a_sites_hostile_payload_is_as_if_its_reply_was_lost(prepared, lost, tmp_path, kind):
    """The payload itself is bad (not bytes, unreadable), or its clients' replies are all
    1e30 from the site hosting the majority: the reply bound's median is over sites."""
    corrupt, why = SITE_FAULTS[kind]

    def hostile(tag, at, s, reply):
        return corrupt(reply) if tag == b"T" and at == AT and s == "site-1" else reply

    run_dir, _ = deployed(prepared, tmp_path / "run", hostile)
    assert_same_run(run_dir, lost("site"))
    rec = read(run_dir)[AT]
    assert sorted(rec["client_steps"]) == ["3", "4"]
    if kind == "majority-1e30":  # read and screened: rejected, not missing
        assert sorted(rec["rejected"]) == ["0", "1", "2"] and "missing" not in rec
        assert all(why in v and "median" in v for v in rec["rejected"].values())
    else:
        assert rec["missing"] == [0, 1, 2] and "rejected" not in rec
        assert why in rec["site_rejected"]["site-1"], rec["site_rejected"]
    assert "site_rejected" not in read(run_dir)[AT + 1]
    assert torch.isfinite(theta(run_dir)).all()


def test_a_site_answering_for_another_sites_client_is_ignored(prepared, lost, tmp_path):
    """site-2 also sends a reply for client VICTIM (site-1's): dropped with a note, so the
    genuine one counts and the run is the clean one."""
    def spoof(tag, at, s, reply):
        if tag == b"T" and at == AT and s == "site-2":
            def add(items):
                r = ClientReply.from_bytes(items[3])
                items[VICTIM] = ClientReply(r.round, VICTIM, [1e3] * len(r.scalars),
                                            r.num_samples, r.train_loss).to_bytes()
            return edit_items(reply, add)
        return reply

    run_dir, _ = deployed(prepared, tmp_path / "run", spoof)
    assert_same_run(run_dir, lost("clean"))
    rec = read(run_dir)[AT]
    assert "missing" not in rec and "rejected" not in rec
    assert rec["site_rejected"] == {"site-2": f"answered for clients [{VICTIM}] it does not "
                                              "host (dropped)"}


# ---- evaluation replies --------------------------------------------------------------------

def _eval_edit(change):
    def edit(blob: bytes) -> bytes:
        res = json.loads(blob[1:])
        change(res)
        return b"E" + json.dumps(res).encode()
    return edit


EVAL_FAULTS = {
    "int": (lambda b: 7, "not bytes (int)"),
    "not-json": (lambda b: b"E{not json", "not JSON"),
    "array": (lambda b: b"E[1, 2]", "not a JSON object"),
    "wrong-tag": (lambda b: b"T" + b[1:], "not an evaluation reply"),
    "n-zero": (_eval_edit(lambda r: r.update(n=0)), "n must be"),
    "n-float": (_eval_edit(lambda r: r.update(n=float(r["n"]))), "n must be"),
    "nan-accuracy": (_eval_edit(lambda r: r.update(accuracy=math.nan)), "accuracy"),
    "inf-loss": (_eval_edit(lambda r: r.update(loss=math.inf)), "loss"),
    "int-beyond-float-loss": (_eval_edit(lambda r: r.update(loss=10**400)), "loss"),
    "int-beyond-float-logit": (_eval_edit(lambda r: r["logits"][0].__setitem__(0, 10**400)),
                               "logits"),
    "share-length": (_eval_edit(lambda r: r["predicted_share"].append(0.0)), "predicted_share"),
    "logits-short": (_eval_edit(lambda r: r["logits"].pop()), "logits"),
    "logits-nan": (_eval_edit(lambda r: r["logits"][0].__setitem__(0, math.nan)), "logits"),
    "logits-width": (_eval_edit(lambda r: [x.append(0.0) for x in r["logits"]]), "logits"),
    "labels-short": (_eval_edit(lambda r: r["labels"].pop()), "labels"),
    "labels-range": (_eval_edit(lambda r: r["labels"].__setitem__(0, 5)), "labels"),
    "labels-float": (_eval_edit(lambda r: r["labels"].__setitem__(0, 0.5)), "labels"),
    "lost": (lambda b: LOST, "no reply"),
}


@pytest.mark.parametrize("kind", list(EVAL_FAULTS))
def test_a_hostile_evaluation_reply_leaves_that_evaluation_missing(prepared, lost, tmp_path,
                                                                   kind):
    """site-1, the one site evaluating the shared test split, sends a bad evaluation of the
    last round: the evaluation is missing (test metrics None) with the reason, the run ends,
    summary.json keeps the last good evaluation."""
    corrupt, why = EVAL_FAULTS[kind]

    def hostile(tag, at, s, reply):
        return corrupt(reply) if tag == b"E" and at == ROUNDS else reply

    run_dir, flare = deployed(prepared, tmp_path / "run", hostile)
    assert_same_run(run_dir, lost("evaluation"))
    assert torch.equal(theta(run_dir), theta(lost("clean")))  # evaluation never trains
    records = read(run_dir)
    last = records[ROUNDS]
    assert last["test_accuracy"] is None and last["test_auc"] is None
    assert why in last["eval_rejected"]["site-1"], last["eval_rejected"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == records[ROUNDS - 1]["test_accuracy"] is not None
    # the evaluation exchange waits round_timeout, not the job's timeout
    assert {t for tag, t in flare.timeouts if tag == b"E"} == {600}


def test_a_run_whose_evaluations_all_fail_still_finishes(prepared, tmp_path):
    run_dir, _ = deployed(prepared, tmp_path / "run", lambda tag, at, s, reply: (
        b"E{" if tag == b"E" else reply))
    records = read(run_dir)
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    assert all(r["test_accuracy"] is None and "eval_rejected" in r for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initial_accuracy"] is None and summary["final_accuracy"] is None
    assert "no evaluation" in summary["gain"]


def test_the_sites_that_evaluate_properly_are_kept(prepared):
    """Two evaluating sites, one of them hostile: the record is that of the other alone."""
    rng = np.random.default_rng(0)

    def answer(n):
        logits = rng.standard_normal((n, 2)).astype(np.float32)
        labels = rng.integers(0, 2, n)
        return b"E" + json.dumps({"n": n, "accuracy": float((logits.argmax(1) == labels).mean()),
                                  "loss": 0.7, "predicted_share": [0.5, 0.5],
                                  "logits": logits.tolist(), "labels": labels.tolist()}).encode()

    good, bad = answer(12), answer(8)
    hostile = b"E" + json.dumps({**json.loads(bad[1:]), "n": -8}).encode()

    class Canned:
        def __init__(self, replies):
            self.replies = replies

        def exchange(self, round_idx, payloads, timeout_s=None):
            return {s: self.replies[s] for s in payloads}

    logs: list[str] = []
    both = SitesEvaluator(Canned({"a": good, "b": hostile}), ["a", "b"], 2, log=logs.append)
    alone = SitesEvaluator(Canned({"a": good}), ["a"], 2)
    rec = both(torch.zeros(3))
    assert rec.pop("eval_rejected") == {"b": "n must be a positive integer, got -8"}
    assert rec == alone(torch.zeros(3)) and rec["test_examples"] == 12
    assert len(logs) == 1 and "site b" in logs[0]


# ---- hellos --------------------------------------------------------------------------------

def _hello(change):
    def edit(blob):
        h = json.loads(blob[1:])
        change(h)
        return b"H" + json.dumps(h).encode()
    return edit


HELLO_FAULTS = {
    "nan-size": (_hello(lambda h: h["clients"].update({"3": math.nan})), "client 3: size nan"),
    "zero-size": (_hello(lambda h: h["clients"].update({"3": 0})), "client 3: size 0"),
    "negative": (_hello(lambda h: h["clients"].update({"3": -4})), "client 3: size -4"),
    "fraction": (_hello(lambda h: h["clients"].update({"3": 2.5})), "client 3: size 2.5"),
    "bool": (_hello(lambda h: h["clients"].update({"3": True})), "client 3: size True"),
    "string": (_hello(lambda h: h["clients"].update({"3": "12"})), "client 3: size '12'"),
    "huge": (_hello(lambda h: h["clients"].update({"3": 2**41})), "client 3: size 2199023255552"),
    "claims-another": (_hello(lambda h: h["clients"].update({"0": 10**9})),
                       "claims clients [0, 3], the run assigns it [3]"),
    "claims-unknown": (_hello(lambda h: h["clients"].update({"7": 5})),
                       "claims clients [3, 7], the run assigns it [3]"),
    "omits": (_hello(lambda h: h.update(clients={})), "claims clients [], the run assigns it [3]"),
    "bad-id": (_hello(lambda h: h["clients"].update({"x": 5})), "client id 'x'"),
    "long-id": (_hello(lambda h: h["clients"].update({"9" * 5000: 5})), "is not an integer"),
    "no-clients": (_hello(lambda h: h.pop("clients")), "'clients' must map"),
    "evaluates": (_hello(lambda h: h.update(evaluates="yes")), "'evaluates' must be"),
    "array": (lambda b: b"H[]", "not a JSON object"),
    "not-json": (lambda b: b"H{", "not JSON"),
    "not-bytes": (lambda b: 3, "not bytes (int)"),
    "wrong-tag": (lambda b: b"T" + b[1:], "not a hello reply"),
}


@pytest.fixture(scope="module")
def hello_sites(prepared):
    return handlers(prepared)  # a hello that fails changes nothing at a site: shared


@pytest.mark.parametrize("kind", list(HELLO_FAULTS))
def test_a_bad_hello_stops_the_run_before_round_1_naming_the_site(prepared, hello_sites,
                                                                  tmp_path, kind):
    corrupt, why = HELLO_FAULTS[kind]
    run_dir = Path(shutil.copytree(prepared, tmp_path / "run"))
    flare = Flare(hello_sites, lambda tag, at, s, reply: (
        corrupt(reply) if tag == b"H" and s == "site-2" else reply))
    with pytest.raises(RuntimeError) as e:
        serve(flare, str(run_dir), SITES)
    msg = str(e.value)
    assert msg.startswith("site site-2: bad hello: ") and why in msg and "\n" not in msg, msg
    assert set(flare.timeouts) == {(b"H", None)}  # nothing else was sent
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_site_mapping_that_does_not_cover_the_clients_once_is_refused(prepared, hello_sites,
                                                                        tmp_path):
    run_dir = Path(shutil.copytree(prepared, tmp_path / "run"))
    twice = {"site-1": [0, 1, 2], "site-2": [3, 2], "site-3": [4]}
    with pytest.raises(RuntimeError, match=r"sites host clients \[0, 1, 2, 2, 3, 4\], the run "
                                           "has 5"):
        serve(Flare(hello_sites), str(run_dir), twice)


# ---- real FLARE processes ------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_flare(tmp_path_factory, tiny_model_dir):
    """One provisioned deployment (server and two sites as processes, mutual TLS, private
    namespaces), the sites running deploy_hostile.py's handler, for two jobs: the run "run"
    (site-2 hostile in train rounds, site-1, the majority host and the evaluating site, in
    train rounds and evaluations), then "bad_hello" (site-2's hello claims client 0). Beside
    them, the in-process serve() of "run" in which those replies were lost."""
    pytest.importorskip("nvflare", reason="nvflare not installed (pip install nvflare==2.9.0)")
    from fedmeerkat.deploy import selftest

    why = selftest.netns_available()
    if why:
        pytest.skip(f"no private namespaces for the deployment test ({why})")
    import deploy_hostile as dh

    from fedmeerkat.config import load_config
    from fedmeerkat.deploy.meerkat import prepare_run

    root = tmp_path_factory.mktemp("hostile-flare")
    run_dir = prepare_run(load_config(None, [*base_overrides(root, tiny_model_dir,
                                                             rounds=dh.ROUNDS),
                                             "downlink=scalars", f"out={root / 'run'}"]),
                          quiet=True)
    ref = Path(shutil.copytree(run_dir, root / "lost"))
    bad_hello = Path(shutil.copytree(run_dir, root / dh.BAD_HELLO_RUN))
    sites = selftest.MEERKAT_SITES
    with pytest.MonkeyPatch.context() as mp:
        # the site trainers import the hostile handler from here
        tests_dir = str(Path(__file__).resolve().parent)
        mp.setenv("PYTHONPATH", tests_dir + ":" + str(Path(tests_dir).parent))
        mp.setenv("FEDMEERKAT_DEPLOY_ALLOW", "deploy_hostile.")
        result = selftest.launch(root / "deploy", [
            "--rounds", "1", "--runs", f"{run_dir},{bad_hello}", "--job-timeout", "120",
            "--meerkat-job", json.dumps({"handler": "deploy_hostile:hostile_site"})],
            timeout_s=300)
    assert result["returncode"] == 0, result.get("error") or result["output"]

    def lose(tag, at, s, reply):
        if tag == b"T" and s == dh.HOSTILE and at in dh.CORRUPT:
            return LOST
        if tag == b"T" and s == dh.MAJORITY and at in dh.MAJORITY_CORRUPT:
            return edit_items(reply, lambda items: [items.pop(k)
                                                    for k in dh.MAJORITY_CORRUPT[at][1]])
        if tag == b"E" and s == dh.MAJORITY and at in dh.EVAL_CORRUPT:
            return LOST
        return reply

    serve(Flare({s: site(s, a) for s, a in site_args(ref, sites).items()}, lose), str(ref),
          sites)
    return {"result": result, "run": run_dir, "lost": ref, "bad_hello": bad_hello,
            "results": root / "deploy" / "results"}


@pytest.mark.deploy
def test_a_hostile_site_over_real_flare_ends_as_if_its_replies_were_lost(real_flare):
    """site-2 runs deploy_hostile.py's handler: in each of 12 rounds one hostile kind (a NaN
    reply, a payload that is not bytes, a truncated payload, then inf, 1e30, a NaN loss, too
    few and too many scalars, a vector reply, garbage, another round's reply, a spoofed id).
    The job finishes and matches, bit for bit, the in-process serve() in which site-2's replies
    of those rounds (and site-1's below) were lost, with each reason in metrics.jsonl."""
    import deploy_hostile as dh

    run_dir = real_flare["run"]
    assert real_flare["result"]["runs"][str(run_dir)]["status"] == "FINISHED:COMPLETED", \
        real_flare["result"]["runs"]
    assert_same_run(run_dir, real_flare["lost"])
    records = read(run_dir)
    for r, (_, why) in dh.CORRUPT.items():
        if r in dh.PAYLOAD_ROUNDS:
            assert records[r]["missing"] == [2] and why in records[r]["site_rejected"]["site-2"]
        else:
            assert why in records[r]["rejected"]["2"], (r, records[r].get("rejected"))
        assert sorted(records[r]["client_steps"]) == ["0", "1"]


@pytest.mark.deploy
def test_a_hostile_majority_host_and_evaluator_over_real_flare_ends_as_if_lost(real_flare):
    """site-1 hosts two of the three clients and is the one site evaluating: 1e30 from both
    its clients in one round (rejected against site-2's median: one site, one vote), a NaN
    from one of them in another, and in each of 17 evaluations one hostile evaluation reply
    (every kind of EVAL_FAULTS but a lost one). Bit-identical to the run in which they were
    lost; each of those evaluations is missing (test metrics None) with its reason."""
    import deploy_hostile as dh

    run_dir = real_flare["run"]
    assert_same_run(run_dir, real_flare["lost"])
    records = read(run_dir)
    assert [r["round"] for r in records] == list(range(dh.ROUNDS + 1))
    for r, (_, left_out, why) in dh.MAJORITY_CORRUPT.items():
        rec = records[r]
        assert sorted(rec["rejected"]) == [str(k) for k in left_out], (r, rec.get("rejected"))
        assert all(why in v for v in rec["rejected"].values()), rec["rejected"]
        assert "missing" not in rec and "site_rejected" not in rec
        assert sorted(rec["client_steps"]) == sorted({"0", "1", "2"} - {str(k) for k in left_out})
    assert all("exceeds" in v for v in records[13]["rejected"].values())
    assert set(dh.EVAL_CORRUPT.values()) == set(EVAL_FAULTS) - {"lost"}
    for r, rec in enumerate(records):
        if r in dh.EVAL_CORRUPT:
            assert all(rec[k] is None for k in KEYS if k.startswith("test_")), rec
            assert rec["predicted_share"] is None
            assert list(rec["eval_rejected"]) == ["site-1"]
            assert EVAL_FAULTS[dh.EVAL_CORRUPT[r]][1] in rec["eval_rejected"]["site-1"], rec
        else:
            assert "eval_rejected" not in rec and rec["test_accuracy"] is not None, rec
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initial_accuracy"] == records[0]["test_accuracy"]
    assert summary["final_accuracy"] == records[-1]["test_accuracy"]


@pytest.mark.deploy
def test_a_bad_hello_over_real_flare_ends_the_job_before_round_1_with_the_reason(real_flare):
    """site-2's hello also claims client 0 (site-1's): the job ends (FLARE ends it, it does
    not hang) with the server's one-line reason in the job's log, and no round is written."""
    from fedmeerkat.deploy.admin import reason_from_logs

    run = real_flare["result"]["runs"][str(real_flare["bad_hello"])]
    assert run["status"].startswith("FINISHED") and run["status"] != "FINISHED:COMPLETED", run
    assert not (real_flare["bad_hello"] / "metrics.jsonl").exists()
    assert not (real_flare["bad_hello"] / "summary.json").exists()
    assert "bad hello: claims clients [0, 2]" in (real_flare["bad_hello"] / "server.log").read_text()
    reason = reason_from_logs(real_flare["results"] / real_flare["bad_hello"].name)
    assert reason is not None and reason.endswith(
        "site site-2: bad hello: claims clients [0, 2], the run assigns it [2]"), reason
