"""The fault suite's figures (docs/reliability.md): faults injected, bad input tried, runs
survived, data lost. Everything runs on a tiny random Llama and a generated local dataset, so
it needs no network and takes a few minutes on 2 cores.

    .venv/bin/python benchmarks/fault_suite.py [--kills 3] [--seed 0]

1. Hostile replies: real `fedmeerkat run` code (in process) with a transport that, every round,
   replaces one seeded-random client's reply with a bad one (NaN, inf, 1e30, short, long, wrong
   type, truncated, garbage, another round, a spoofed id, an unknown client id). Survived: the
   run finishes. No data lost: its final state is bit-identical to the run in which the same
   clients' replies were simply lost, and every bad reply is listed with a reason in
   metrics.jsonl. Both downlinks.
2. Crashes: a real `python -m fedmeerkat.cli.main run` process is killed with SIGKILL at a
   seeded-random moment `--kills` times and resumed each time (once after truncating its
   latest checkpoint); survived and lost as above, against an uninterrupted run.
3. Bad input: each value of `BAD_INPUT` must end with exit code 2 and one line on stderr, no
   traceback.
4. The deployed path: the deployed server (`fedmeerkat.deploy.serve.serve`) driven by a fake
   FLARE that calls the real site handlers in process, three sites (site-1 hosts 3 of the 5
   clients). Every round one seeded-random client's reply inside its site's payload is
   replaced by each kind of 1; or one seeded-random site's whole payload by a bad one (not
   bytes, unreadable, an answer for another site's client); or site-1, the majority, sends
   1e30 for all its clients; or the evaluating site's every evaluation reply is bad. Survived
   and lost as in 1, against the run in which the same replies were lost. Hostile hellos
   (bad client sizes or ids, claims of another site's client, not JSON) must stop the run
   before round 1 with one line naming the site.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import write_result
from safetensors.torch import load_file

from fedmeerkat.cli.main import main as cli
from fedmeerkat.config import load_config
from fedmeerkat.deploy.framing import pack_reply, unpack_reply
from fedmeerkat.deploy.meerkat import prepare_run, site_args
from fedmeerkat.deploy.serve import serve
from fedmeerkat.deploy.site import site
from fedmeerkat.federated.messages import ClientReply, VectorReply
from fedmeerkat.models.tiny import save_tiny_llama
from fedmeerkat.runners import simulation
from fedmeerkat.runners.inprocess import InProcessTransport
from fedmeerkat.runners.run_folder import MetricsLog

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the movie was great terrible good bad fun dull boring lovely awful plot actors "
         "film it is a an and but so very not review").split()


def _edit(blob: bytes, **change) -> bytes:
    r = ClientReply.from_bytes(blob)
    for k, v in change.items():
        setattr(r, k, v(r) if callable(v) else v)
    return r.to_bytes()


# kind -> (client id the bad reply arrives under, given the victim and K; the bad bytes)
REPLY_FAULTS = {
    "nan": lambda k, b: (k, _edit(b, scalars=lambda r: [math.nan, *r.scalars[1:]])),
    "inf": lambda k, b: (k, _edit(b, scalars=lambda r: [*r.scalars[:-1], math.inf])),
    "huge_1e30": lambda k, b: (k, _edit(b, scalars=lambda r: [1e30, *r.scalars[1:]])),
    "too_few_scalars": lambda k, b: (k, _edit(b, scalars=lambda r: r.scalars[:-1])),
    "too_many_scalars": lambda k, b: (k, _edit(b, scalars=lambda r: [*r.scalars, 0.1])),
    "wrong_type": lambda k, b: (k, VectorReply(ClientReply.from_bytes(b).round, k,
                                               torch.zeros(3), 10, 2).to_bytes()),
    "truncated": lambda k, b: (k, b[:-3]),
    "garbage": lambda k, b: (k, bytes(random.Random(k).randrange(256) for _ in range(len(b)))),
    "another_round": lambda k, b: (k, _edit(b, round=lambda r: r.round + 1)),
    "spoofed_id": lambda k, b: (k, _edit(b, client_id=lambda r: r.client_id + 1)),
    "unknown_client": lambda k, b: (10_000 + k, b),
}


def _data(tmp: Path) -> tuple[str, str, str]:
    model = str(save_tiny_llama(tmp / "model", vocab_words=WORDS))
    rng = random.Random(0)
    pos, neg = ["great", "good", "fun", "lovely"], ["terrible", "bad", "dull", "awful"]
    rows = ["sentence,label"] + [
        f"the film was {rng.choice(pos if i % 2 else neg)} and "
        f"{rng.choice(pos if i % 2 else neg)},{i % 2}" for i in range(80)]
    (tmp / "reviews.csv").write_text("\n".join(rows) + "\n")
    (tmp / "calib.txt").write_text("\n".join(
        " ".join(["the film was a very good film and the actors were lovely"] * 3)
        for _ in range(8)) + "\n")
    return model, str(tmp / "reviews.csv"), str(tmp / "calib.txt")


def _args(model: str, csv: str, calib: str, out: Path, *extra: str) -> list[str]:
    return ["run", f"model={model}", "task=local", f"data_files={csv}",
            "template={sentence} so it was", "label_words=[' bad', ' good']",
            f"calib_corpus={calib}", "calib_sequences=4", "calib_seq_len=32", "density=0.01",
            "clients=4", "rounds=4", "local_steps=3", "batch_size=4", "lr=0.01", "eval_every=2",
            "partition=dirichlet", "alpha=0.5", f"out={out}", "--quiet", *extra]


def _theta(run: Path) -> torch.Tensor:
    return load_file(str(run / "final_state.safetensors"))["theta"]


def _records(run: Path) -> list[dict]:
    return MetricsLog(run / "metrics.jsonl").read()


def _victim(seed: int, r: int, k: int) -> int:
    return int(np.random.default_rng([seed, r]).integers(k))


def _run_with(transport_cls, args: list[str]) -> int:
    orig = simulation.InProcessTransport
    simulation.InProcessTransport = transport_cls  # type: ignore[misc]
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return cli(args)
    finally:
        simulation.InProcessTransport = orig  # type: ignore[misc]


def hostile_replies(model, csv, calib, tmp: Path, seed: int) -> dict:
    rows = []
    for downlink in ("sparse-weights", "scalars"):
        def lose(kind):
            class Faulty(InProcessTransport):
                def exchange(self, round_idx, plans, deadline):
                    got = super().exchange(round_idx, plans, deadline)
                    k = _victim(seed, round_idx, len(plans))
                    blob = got.pop(k)
                    if kind is not None:
                        at, bad = REPLY_FAULTS[kind](k, blob)
                        got[at] = bad
                    return got
            return Faulty

        ref = tmp / f"lost-{downlink}"
        assert _run_with(lose(None), _args(model, csv, calib, ref, f"downlink={downlink}")) == 0
        for kind in REPLY_FAULTS:
            out = tmp / f"{kind}-{downlink}"
            rc = _run_with(lose(kind), _args(model, csv, calib, out, f"downlink={downlink}"))
            recs = _records(out)[1:] if rc == 0 else []
            logged = sum(len(r.get("rejected", {})) for r in recs)
            same = rc == 0 and torch.equal(_theta(out), _theta(ref))
            rows.append({"kind": kind, "downlink": downlink, "injected": 4, "exit_code": rc,
                         "rejected_with_reason": logged, "survived": rc == 0,
                         "bit_identical_to_lost_reply_run": same,
                         "example_reason": next(iter(recs[0].get("rejected", {}).values()), None)
                         if recs else None})
            print(f"replies {downlink:<14} {kind:<17} rc {rc} rejected {logged}/4 "
                  f"identical {same}", flush=True)
    return {"rows": rows, "kinds": len(REPLY_FAULTS),
            "injected": sum(r["injected"] for r in rows),
            "runs": len(rows), "survived": sum(r["survived"] for r in rows),
            "bit_identical": sum(r["bit_identical_to_lost_reply_run"] for r in rows),
            "logged": sum(r["rejected_with_reason"] for r in rows)}


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, FEDMEERKAT_CACHE=str(cache), PYTHONPATH=str(ROOT),
                OMP_NUM_THREADS="1")


def crashes(model, csv, calib, tmp: Path, kills: int, seed: int) -> dict:
    extra = ("rounds=8", "local_steps=60", "threads=1", "downlink=scalars", "clients_per_round=3")
    full = tmp / "crash-full"
    t0 = time.monotonic()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli(_args(model, csv, calib, full, *extra)) == 0
    span = time.monotonic() - t0  # training and evaluation, without process start-up
    cut = tmp / "crash-cut"
    rng = random.Random(seed)
    env = _env(Path(os.environ["FEDMEERKAT_CACHE"]))
    events = []
    cmd = [sys.executable, "-m", "fedmeerkat.cli.main", *_args(model, csv, calib, cut, *extra)]
    for i in range(kills + 1):
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            if i < kills:
                # once this process is past its start-up (its first checkpoint is on disk, or
                # it resumed from one), a seeded-random moment within one run's length
                started = time.monotonic() + 120
                while (proc.poll() is None and time.monotonic() < started
                       and not (cut / "checkpoint.safetensors").is_file()):
                    time.sleep(0.01)
                if i > 0:
                    time.sleep(2.0)  # the resumed process's imports and model load
                try:
                    proc.wait(timeout=rng.uniform(0.1, 0.6) * span)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        done = (cut / "final_state.safetensors").is_file()
        rounds = len(_records(cut)) - 1 if (cut / "metrics.jsonl").is_file() else -1
        event = {"attempt": i + 1, "exit_code": proc.returncode, "rounds_on_disk": rounds,
                 "finished": done}
        if done:
            events.append(event)
            break
        if i == 1 and (cut / "checkpoint.safetensors").is_file():  # damage the latest one
            p = cut / "checkpoint.safetensors"
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            event["truncated_latest_checkpoint"] = True
        events.append(event)
        cmd = [sys.executable, "-m", "fedmeerkat.cli.main", "run", "--resume", str(cut), "--quiet"]
    finished = (cut / "final_state.safetensors").is_file()
    same = finished and torch.equal(_theta(full), _theta(cut))
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    same_metrics = finished and strip(_records(full)) == strip(_records(cut))
    killed = sum(1 for e in events if e["exit_code"] == -signal.SIGKILL)
    print(f"crashes: {killed} SIGKILLs, finished {finished}, identical state {same}, "
          f"metrics {same_metrics}", flush=True)
    return {"events": events, "sigkills": killed, "runs": 1, "survived": int(finished),
            "bit_identical_final_state": same, "identical_metrics": same_metrics,
            "uninterrupted_seconds": round(span, 1)}


def bad_input(model, csv, calib, tmp: Path) -> dict:
    mask = tmp / "bad_mask.safetensors"
    from safetensors.torch import save_file

    save_file({"idx::w": torch.tensor([1, 3, 3], dtype=torch.int64)}, str(mask), metadata={
        "format_version": "1", "names": json.dumps(["w"]), "shapes": json.dumps([[4, 4]])})
    bad_csv = tmp / "bad.csv"
    bad_csv.write_text("text,stars\nthe film,1\n")
    base = ["run", "--dry-run"]
    cases = {
        "unknown task": [*base, "task=nope"], "unknown model": [*base, "model=not a model!"],
        "unknown method": [*base, "method=sgd"], "unknown partition": [*base, "partition=zipf"],
        "non-finite lr": [*base, "lr=inf"], "non-finite eps": [*base, "eps=nan"],
        "density out of range": [*base, "density=2"],
        "local_steps beyond u16": [*base, "local_steps=70000"],
        "rounds beyond u32": [*base, "rounds=4294967296"],
        "invalid regex": [*base, "eligible=("],
        "missing calibration corpus": [*base, "calib_corpus=/no/such/corpus.txt"],
        "unknown key": [*base, "lerning_rate=1"],
        "mask with repeated indices": [*base, f"mask={mask}"],
        "data file without the columns": _args(model, str(bad_csv), calib, tmp / "bad-data"),
        "label words not single tokens": _args(model, csv, calib, tmp / "bad-words",
                                               "label_words=[' bad', ' good good']"),
        "more clients than examples": _args(model, csv, calib, tmp / "bad-clients",
                                            "clients=200", "partition=iid"),
        "resume of a folder with no checkpoint": ["run", "--resume", str(tmp)],
    }
    rows = []
    for name, args in cases.items():
        err = io.StringIO()
        tb = None
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli(args)
        except BaseException as e:  # noqa: BLE001 - a traceback is what this counts
            rc, tb = None, f"{type(e).__name__}: {e}"
        # progress lines may come first; the error is one line of its own, the last one
        # the suite's scratch folder is this machine's: named <work> in the result
        lines = [x.replace(str(tmp), "<work>") for x in err.getvalue().splitlines()
                 if x.startswith("fedmeerkat:")]
        ok = (rc == 2 and tb is None and len(lines) == 1 and "Traceback" not in err.getvalue()
              and err.getvalue().rstrip().replace(str(tmp), "<work>").endswith(lines[0]))
        rows.append({"input": name, "exit_code": rc, "stderr_last_line": lines[-1] if lines else "",
                     "one_line_exit_2": ok, "uncaught": tb})
        print(f"bad input {name:<40} rc {rc} ok {ok}  {lines[-1][:90] if lines else tb}",
              flush=True)
    return {"rows": rows, "tried": len(rows), "one_line_exit_2": sum(r["one_line_exit_2"]
                                                                    for r in rows)}


# ---- the deployed path ---------------------------------------------------------------------
SITES = {"site-1": [0, 1, 2], "site-2": [3], "site-3": [4]}  # site-1 hosts the majority
LOST = object()  # what an edit returns for a reply that never arrived


class FakeFlare:
    """The FLARE transport's `exchange`, calling the site handlers in process; `edit(tag, at,
    site, reply)` changes (or, returning LOST, drops) a site's answer. `at`: the round of a
    train exchange, the number of the evaluation (0: the initial model), 0 for the hello."""

    def __init__(self, handlers, edit):
        self.handlers, self.edit, self.evaluations = handlers, edit, 0

    def exchange(self, round_idx, payloads, timeout_s=None):
        tag = next(iter(payloads.values()))[:1]
        at = round_idx
        if tag == b"E":
            at, self.evaluations = self.evaluations, self.evaluations + 1
        got = {}
        for s, blob in payloads.items():
            reply = self.edit(tag, at, s, self.handlers[s](blob))
            if reply is not LOST:
                got[s] = reply
        return got


def _items(reply: bytes, change) -> bytes:
    pid, compute_s, forward_s, items = unpack_reply(reply)
    change(items)
    return pack_reply(pid, compute_s, forward_s, items)


def _client_fault(kind, seed):
    """kind of REPLY_FAULTS (None: the reply lost) for a seeded-random client each round."""
    site_of = {k: s for s, ks in SITES.items() for k in ks}

    def edit(tag, at, s, reply):
        k = _victim(seed, at, 5)
        if tag != b"T" or site_of[k] != s:
            return reply

        def change(items):
            blob = items.pop(k)
            if kind is not None:
                to, bad = REPLY_FAULTS[kind](k, blob)
                items[to] = bad
        return _items(reply, change)
    return edit


def _huge_all(items):
    for k, blob in items.items():
        r = ClientReply.from_bytes(blob)
        items[k] = ClientReply(r.round, k, [1e30] * len(r.scalars), r.num_samples,
                               r.train_loss).to_bytes()


# a site's whole train reply replaced (every round, a seeded-random site)
PAYLOAD_FAULTS = {
    "not_bytes_int": lambda b: 7, "not_bytes_none": lambda b: None,
    "not_bytes_dict": lambda b: {"blob": b}, "not_bytes_str": lambda b: b.decode("latin-1"),
    "garbage_payload": lambda b: b"T" + bytes(random.Random(len(b)).randrange(256)
                                              for _ in range(len(b) - 1)),
    "truncated_payload": lambda b: b[:-5], "trailing_bytes": lambda b: b + b"\0",
    "wrong_tag": lambda b: b"E" + b[1:],
}


def _site_fault(kind, seed):
    def edit(tag, at, s, reply):
        if tag != b"T" or s != list(SITES)[_victim(seed, at, len(SITES))]:
            return reply
        return LOST if kind is None else PAYLOAD_FAULTS[kind](reply)
    return edit


def _majority(huge):
    def edit(tag, at, s, reply):
        if tag != b"T" or s != "site-1":
            return reply
        return _items(reply, _huge_all) if huge else LOST
    return edit


def _eval_edit(change):
    def edit(blob):
        res = json.loads(blob[1:])
        change(res)
        return b"E" + json.dumps(res).encode()
    return edit


# the evaluating site's every evaluation reply replaced (None: lost)
EVAL_FAULTS = {
    "lost": None, "not_bytes": lambda b: 7, "not_json": lambda b: b"E{not json",
    "n_zero": _eval_edit(lambda r: r.update(n=0)),
    "nan_accuracy": _eval_edit(lambda r: r.update(accuracy=math.nan)),
    "short_logits": _eval_edit(lambda r: r["logits"].pop()),
    "label_out_of_range": _eval_edit(lambda r: r["labels"].__setitem__(0, 7)),
}


def _eval_fault(kind):
    def edit(tag, at, s, reply):
        if tag != b"E":
            return reply
        return LOST if EVAL_FAULTS[kind] is None else EVAL_FAULTS[kind](reply)
    return edit


def _hello_edit(change):
    def edit(blob):
        h = json.loads(blob[1:])
        change(h)
        return b"H" + json.dumps(h).encode()
    return edit


HELLO_FAULTS = {
    "nan_size": _hello_edit(lambda h: h["clients"].update({"3": math.nan})),
    "zero_size": _hello_edit(lambda h: h["clients"].update({"3": 0})),
    "fractional_size": _hello_edit(lambda h: h["clients"].update({"3": 2.5})),
    "size_beyond_2_40": _hello_edit(lambda h: h["clients"].update({"3": 2**41})),
    "claims_another_sites_client": _hello_edit(lambda h: h["clients"].update({"0": 10**9})),
    "claims_an_unknown_client": _hello_edit(lambda h: h["clients"].update({"9": 5})),
    "omits_its_client": _hello_edit(lambda h: h.update(clients={})),
    "client_id_not_an_integer": _hello_edit(lambda h: h["clients"].update({"x": 5})),
    "evaluates_not_a_bool": _hello_edit(lambda h: h.update(evaluates="yes")),
    "not_json": lambda b: b"H{", "not_an_object": lambda b: b"H[]", "not_bytes": lambda b: 3,
}


def _serve(prepared: Path, out: Path, edit) -> tuple[Path, str | None, FakeFlare]:
    """(run folder, None or the error the deployed run raised, the fake FLARE it ran on)."""
    import shutil

    run_dir = Path(shutil.copytree(prepared, out))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        flare = FakeFlare({s: site(s, a) for s, a in site_args(run_dir, SITES).items()}, edit)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            serve(flare, str(run_dir), SITES)
    except Exception as e:  # noqa: BLE001 - a run that raised is what this counts
        return run_dir, f"{type(e).__name__}: {e}", flare
    return run_dir, None, flare


def deployed(model, csv, calib, tmp: Path, seed: int) -> dict:
    rows, evals, hellos = [], [], []
    for downlink in ("sparse-weights", "scalars"):
        cfg = load_config(None, [a for a in _args(model, csv, calib, tmp / f"deployed-{downlink}",
                                                  f"downlink={downlink}", "clients=5")
                                 if a not in ("run", "--quiet")])
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            prepared = prepare_run(cfg, quiet=True)
        refs = {name: _serve(prepared, tmp / f"dep-{name}-{downlink}", edit)[0]
                for name, edit in (("clean", lambda tag, at, s, reply: reply),
                                   ("client", _client_fault(None, seed)),
                                   ("site", _site_fault(None, seed)),
                                   ("majority", _majority(False)))}
        cases = ([(k, "client", _client_fault(k, seed)) for k in REPLY_FAULTS]
                 + [(k, "site", _site_fault(k, seed)) for k in PAYLOAD_FAULTS]
                 + [("majority_site_1e30", "majority", _majority(True))])
        for kind, ref, edit in cases:
            out, err, _ = _serve(prepared, tmp / f"dep-{kind}-{downlink}", edit)
            recs = _records(out)[1:] if err is None else []
            logged = sum(1 for r in recs if r.get("rejected") or r.get("site_rejected"))
            same = err is None and torch.equal(_theta(out), _theta(refs[ref]))
            first = recs[0] if recs else {}
            reason = next(iter({**first.get("rejected", {}),
                                **first.get("site_rejected", {})}.values()), None)
            rows.append({"kind": kind, "downlink": downlink, "what": ref, "injected": 4,
                         "survived": err is None, "error": err,
                         "rounds_with_reason_in_metrics": logged,
                         "bit_identical_to_lost_reply_run": same, "example_reason": reason})
            print(f"deployed {downlink:<14} {kind:<22} survived {err is None} reasons "
                  f"{logged}/4 identical {same}", flush=True)
        for kind in EVAL_FAULTS:
            out, err, flare = _serve(prepared, tmp / f"dep-eval-{kind}-{downlink}",
                                     _eval_fault(kind))
            recs = _records(out) if err is None else []
            evaluated = [r for r in recs if "eval_rejected" in r]
            same = err is None and torch.equal(_theta(out), _theta(refs["clean"]))
            evals.append({"kind": kind, "downlink": downlink, "injected": flare.evaluations,
                          "survived": err is None, "error": err,
                          "evaluations_missing": sum(r["test_accuracy"] is None
                                                     for r in evaluated),
                          "with_reason_in_metrics": len(evaluated),
                          "final_state_identical": same,
                          "example_reason": evaluated[0]["eval_rejected"]["site-1"]
                          if evaluated else None})
            print(f"deployed {downlink:<14} evaluation {kind:<18} survived {err is None} "
                  f"missing {evals[-1]['evaluations_missing']} identical {same}", flush=True)
    for kind, corrupt in HELLO_FAULTS.items():
        out, err, _ = _serve(prepared, tmp / f"dep-hello-{kind}",
                             lambda tag, at, s, reply, c=corrupt: (
                                 c(reply) if tag == b"H" and s == "site-2" else reply))
        ok = (err is not None and err.startswith("RuntimeError: site site-2: bad hello: ")
              and "\n" not in err and not (out / "metrics.jsonl").exists())
        hellos.append({"kind": kind, "refused_before_round_1_one_line": ok, "error": err})
        print(f"deployed hello {kind:<30} refused {ok}  {err}", flush=True)
    return {"rows": rows, "evaluations": evals, "hellos": hellos,
            "kinds": len(REPLY_FAULTS) + len(PAYLOAD_FAULTS) + 1,
            "injected": sum(r["injected"] for r in rows) + sum(e["injected"] for e in evals),
            "runs": len(rows) + len(evals),
            "survived": sum(r["survived"] for r in rows) + sum(e["survived"] for e in evals),
            "bit_identical": sum(r["bit_identical_to_lost_reply_run"] for r in rows)
            + sum(e["final_state_identical"] for e in evals),
            "logged": sum(r["rounds_with_reason_in_metrics"] for r in rows)
            + sum(e["with_reason_in_metrics"] for e in evals),
            "hellos_tried": len(hellos),
            "hellos_refused": sum(h["refused_before_round_1_one_line"] for h in hellos)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="faults-") as d:
        tmp = Path(d)
        os.environ["FEDMEERKAT_CACHE"] = str(tmp / "cache")
        torch.set_num_threads(1)
        model, csv, calib = _data(tmp)
        replies = hostile_replies(model, csv, calib, tmp, args.seed)
        crash = crashes(model, csv, calib, tmp, args.kills, args.seed)
        inputs = bad_input(model, csv, calib, tmp)
        dep = deployed(model, csv, calib, tmp, args.seed)
    lost = (replies["runs"] - replies["bit_identical"]) + (0 if crash["bit_identical_final_state"]
                                                           else 1)
    write_result("faults", {
        "summary": {
            "faults_injected": replies["injected"] + crash["sigkills"] + sum(
                1 for e in crash["events"] if e.get("truncated_latest_checkpoint")),
            "reply_fault_kinds": replies["kinds"], "bad_inputs_tried": inputs["tried"],
            "bad_inputs_one_line_exit_2": inputs["one_line_exit_2"],
            "runs": replies["runs"] + crash["runs"],
            "runs_survived": replies["survived"] + crash["survived"],
            "runs_with_data_lost": lost,
            "deployed_faults_injected": dep["injected"] + dep["hellos_tried"],
            "deployed_reply_fault_kinds": dep["kinds"],
            "deployed_runs": dep["runs"], "deployed_runs_survived": dep["survived"],
            "deployed_runs_with_data_lost": dep["runs"] - dep["bit_identical"],
            "deployed_hellos_tried": dep["hellos_tried"],
            "deployed_hellos_refused_one_line": dep["hellos_refused"],
        },
        "replies": replies, "crashes": crash, "bad_input": inputs, "deployed": dep,
        "wall_seconds": round(time.time() - start, 1),
    })


if __name__ == "__main__":
    main()
