"""Getting a mask for a run: load the given file, reuse a cached one, or compute it.

The cache key covers everything the mask depends on (model fingerprint, density, eligibility
rule, calibration corpus hash, number and length of sequences, and for the other mask kinds the
kind, the seed of a random mask and the hash of the task texts used), so a cached mask is reused
only when it would be recomputed identically.

Mask kinds (`kind`, config key `mask_kind`; all at density u with the same exact count k):
  - "calibration": mean squared gradient on the general-text corpus (the method).
  - "weight-magnitude": top u by |w|.  - "random": k uniform coordinates, from the run seed.
  - "task": like "calibration" but on the task's training texts (prompt + gold label word):
    a seeded sample of `num_sequences` of them, each cut to its last `seq_len` tokens.
  - "union": every client does "task" on a seeded sample of min(num_sequences, its size) of
    its own training texts; the mask is the union (density u or more, in `union_density`).
  - "task-gradient": the coordinates where the label loss's mean gradient over a seeded
    sample of `mask_examples` labelled training examples is largest (squared, estimated
    without bias: zo/calibration.py's "signal" score), with each example's label logits
    centered by the sample's mean logits first. At the zero-shot start of a sentiment task
    nearly all of the plain loss's mean gradient is the calibration shift (every example
    pushed toward the rarely predicted label; on the calibration mask 1.5% of its squared
    norm is left once centered, benchmarks/results/noise_scale.json), which would pick the
    weights that recalibrate rather than those that rank. It needs labels and one backward
    pass per example where it is computed: it is the "mask chosen on the task itself"
    comparator (a centralized run, or a server holding a labelled sample); the clients' steps
    stay inference-only. In a simulation it samples the whole training pool, as "task" does.
    Measured (benchmarks/learning.py, rt-central-mask-task): no better than "calibration" at
    one seed, behind it at two.
Every kind carries the GradIP reference gradient: the mean gradient on the general corpus at
the masked coordinates (`calibration` gets it from its own pass; the others from a second pass
over the same `num_sequences` general sequences, restricted to the mask), so GradIP always
measures against the general-text ("pre-training") gradient whatever chose the mask.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import torch
from tqdm import tqdm

from fedmeerkat.models.loading import cache_dir, load_model, model_fingerprint
from fedmeerkat.models.scoring import LabelScorer, encode_prompts, lm_loss, sample_centered_loss
from fedmeerkat.tasks.corpora import corpus_hash, load_calibration_texts
from fedmeerkat.zo import SparseMask, compute_mask
from fedmeerkat.zo.calibration import masked_mean_gradient
from fedmeerkat.zo.mask_kinds import random_mask, union_masks, weight_magnitude_mask
from fedmeerkat.zo.seeds import TASK_PICK

MIN_CALIB_TOKENS = 16  # shorter texts carry too little gradient signal to be worth a backward
MIN_TASK_TOKENS = 2  # task prompts are short; a next-token loss needs two tokens


def calibration_sequences(tokenizer, texts: list[str], num: int,
                          seq_len: int) -> list[torch.Tensor]:
    """First `num` texts with >= MIN_CALIB_TOKENS tokens, each cut to `seq_len` tokens."""
    seqs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, truncation=True,
                        max_length=seq_len).input_ids
        if len(ids) >= MIN_CALIB_TOKENS:
            seqs.append(torch.tensor(ids, dtype=torch.long))
        if len(seqs) == num:
            break
    if len(seqs) < num:
        print(f"note: calibration corpus gave {len(seqs)} usable sequences (asked {num})",
              file=sys.stderr)
    return seqs


def task_sequences(tokenizer, texts: list[str], seq_len: int) -> list[torch.Tensor]:
    """Each task text tokenized with its LAST `seq_len` tokens kept (the label word ends it),
    as the prompts are encoded for training; texts under MIN_TASK_TOKENS tokens are skipped."""
    return [torch.tensor(ids, dtype=torch.long) for ids in encode_prompts(tokenizer, texts, seq_len)
            if len(ids) >= MIN_TASK_TOKENS]


def pick_texts(texts: list, num: int, seed: int, *tag: int) -> list:
    """A seeded sample of min(num, len(texts)) texts (or any items: "task-gradient" samples
    labelled examples), in their given order (training sets can be sorted by label, so the
    first `num` would not do)."""
    if len(texts) <= num:
        return list(texts)
    rng = np.random.default_rng([TASK_PICK, seed, *tag])
    return [texts[i] for i in np.sort(rng.choice(len(texts), num, replace=False))]


def examples_hash(examples: list[tuple[list[int], int]], label_words: list[str]) -> str:
    """What a task-gradient mask was scored on: the encoded prompts, their labels and the
    label words (its cache key)."""
    data = [[list(map(int, ids)), int(y)] for ids, y in examples]
    return hashlib.sha256(json.dumps([data, list(label_words)]).encode()).hexdigest()[:16]


def mask_key(fingerprint: dict, density: float, rule: str, corpus: str, num: int, seq_len: int,
             kind: str = "calibration", extra: tuple = ()) -> str:
    parts = [fingerprint["structure"], fingerprint["weights"], repr(density), rule, corpus, num,
             seq_len]
    if kind != "calibration":  # calibration keys stay as they were (existing caches still hit)
        parts += [kind, *extra]
    # no dtype: every mask is computed from the float32 checkpoint (float32_twin)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def make_mask(model, tokenizer, texts: list[str], *, model_name: str, density: float, rule: str,
              corpus: str, num_sequences: int, seq_len: int, fingerprint: dict | None = None,
              quiet: bool = False) -> SparseMask:
    fingerprint = fingerprint or model_fingerprint(model)
    seqs = calibration_sequences(tokenizer, texts, num_sequences, seq_len)
    chash = corpus_hash(texts)
    bar = tqdm(total=len(seqs), desc="mask: squared gradients", unit="seq", disable=quiet,
               file=sys.stderr)
    try:
        mask = compute_mask(
            model, seqs, lm_loss, density=density, rule=rule,
            meta={"model": model_name, "fingerprint_structure": fingerprint["structure"],
                  "fingerprint_weights": fingerprint["weights"], "calib_corpus": corpus,
                  "calib_corpus_hash": chash, "seq_len": str(seq_len), "mask_kind": "calibration"},
            progress=lambda n: bar.update(1),
        )
    finally:
        bar.close()
    return mask


def make_mask_of_kind(model, tokenizer, kind: str, calib_texts: list[str], *, model_name: str,
                      density: float, rule: str, corpus: str, num_sequences: int, seq_len: int,
                      seed: int = 0, task_texts: list[str] | None = None,
                      client_texts: list[list[str]] | None = None, fingerprint: dict | None = None,
                      quiet: bool = False, examples: list[tuple[list[int], int]] | None = None,
                      label_words: list[str] | None = None) -> SparseMask:
    """A mask of any kind (see the module doc), with the general-text GradIP reference.

    `task_texts` (kind "task") are the training texts, already sampled by `pick_texts`;
    `client_texts` (kind "union") one such list per client; `examples` (kind "task-gradient")
    encoded prompts with their labels, already sampled, scored against `label_words`.
    `calib_texts` is the general corpus.
    """
    if kind == "calibration":
        return make_mask(model, tokenizer, calib_texts, model_name=model_name, density=density,
                         rule=rule, corpus=corpus, num_sequences=num_sequences, seq_len=seq_len,
                         fingerprint=fingerprint, quiet=quiet)
    fingerprint = fingerprint or model_fingerprint(model)
    meta = {"model": model_name, "fingerprint_structure": fingerprint["structure"],
            "fingerprint_weights": fingerprint["weights"], "calib_corpus": corpus,
            "calib_corpus_hash": corpus_hash(calib_texts), "seq_len": str(seq_len),
            "calib_grad_source": "calib_corpus"}

    def bar(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="seq", disable=quiet, file=sys.stderr)

    def task_mask(texts: list[str], desc: str) -> SparseMask:
        seqs = task_sequences(tokenizer, texts, seq_len)
        b = bar(len(seqs), desc)
        try:
            return compute_mask(model, seqs, lm_loss, density=density, rule=rule,
                                meta={**meta, "mask_kind": "task",
                                      "task_texts_hash": corpus_hash(texts)},
                                progress=lambda n: b.update(1))
        finally:
            b.close()

    if kind == "weight-magnitude":
        mask = weight_magnitude_mask(model, density=density, rule=rule, meta=meta)
    elif kind == "random":
        mask = random_mask(model, density=density, seed=seed, rule=rule, meta=meta)
    elif kind == "task":
        if not task_texts:
            raise ValueError("mask kind 'task' needs the task's training texts")
        mask = task_mask(task_texts, "mask: task squared gradients")
    elif kind == "task-gradient":
        if not examples or len(examples) < 2 or not label_words:
            raise ValueError("mask kind 'task-gradient' needs at least 2 labelled training "
                             "examples and the label words")
        scorer = LabelScorer(model, tokenizer, label_words)
        batches = [scorer.collate([ids], [y]) for ids, y in examples]
        loss = sample_centered_loss(scorer, batches)
        b = bar(len(examples), "mask: task gradient")
        try:
            mask = compute_mask(
                model, batches, lambda m, batch: loss(batch),
                density=density, rule=rule, score="signal", progress=lambda n: b.update(1),
                meta={**meta, "mask_kind": "task-gradient",
                      "task_examples_hash": examples_hash(examples, label_words)})
        finally:
            b.close()
    elif kind == "union":
        if not client_texts or not any(client_texts):
            raise ValueError("mask kind 'union' needs each client's training texts")
        parts = [task_mask(t, f"mask: client {i} squared gradients")
                 for i, t in enumerate(client_texts) if t]
        mask = union_masks(parts, meta={"union_client_sequences": ",".join(
            p.meta["num_sequences"] for p in parts)})
        mask.meta.pop("task_texts_hash", None)  # the first client's; meaningless for the union
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    seqs = calibration_sequences(tokenizer, calib_texts, num_sequences, seq_len)
    b = bar(len(seqs), "mask: GradIP reference gradient")
    try:
        mask.calib_grad = masked_mean_gradient(model, _counted(seqs, b), lm_loss, mask)
    finally:
        b.close()
    mask.meta["calib_grad_sequences"] = str(len(seqs))
    return mask


def _counted(seqs, bar):
    for s in seqs:
        yield s
        bar.update(1)


def describe_mask(mask: SparseMask) -> str:
    """What the mask is, for the source string and the run log (kind; union size)."""
    kind = mask.meta.get("mask_kind", "calibration")
    if kind == "union":
        return (f"union of {mask.meta.get('union_parts', '?')} client masks at density "
                f"{float(mask.meta.get('density', 'nan')):.1e} each, union density "
                f"{float(mask.meta['union_density']):.2e}")
    return f"kind {kind}"


def obtain_mask(model, tokenizer, *, model_name: str, density: float, rule: str, corpus: str,
                num_sequences: int, seq_len: int, path: str = "", quiet: bool = False,
                kind: str = "calibration", seed: int = 0, task_texts: list[str] | None = None,
                client_texts: list[list[str]] | None = None,
                examples: list[tuple[list[int], int]] | None = None,
                label_words: list[str] | None = None,
                num_examples: int = 256) -> tuple[SparseMask, str]:
    """The run's mask and where it came from; the mask is checked against the model.

    kind "task" needs `task_texts` (all training texts: prompt + gold label word); "union"
    needs `client_texts` (the same, one list per client, after partitioning). A seeded sample
    of `num_sequences` texts is used from each (`pick_texts`, seed `seed`); "random" uses
    `seed` too. "task-gradient" needs `examples` (every training example's encoded prompt
    and label) and `label_words`, and samples `num_examples` of them. With `path` the file
    is used as it is, whatever `kind`.
    """
    fingerprint = model_fingerprint(model)
    params = dict(model.named_parameters())
    if path:
        mask = SparseMask.load(path)
        mask.check_model(params, fingerprint)
        return mask, f"file {path}"
    texts = load_calibration_texts(corpus)
    extra: tuple = ()
    if kind == "random":
        extra = (seed,)
    elif kind == "task":
        task_texts = pick_texts(task_texts or [], num_sequences, seed)
        extra = (corpus_hash(task_texts),)
    elif kind == "task-gradient":
        examples = pick_texts(examples or [], num_examples, seed)
        extra = (examples_hash(examples, label_words or []),)
    elif kind == "union":
        client_texts = [pick_texts(t, num_sequences, seed, i)
                        for i, t in enumerate(client_texts or [])]
        extra = tuple(corpus_hash(t) for t in client_texts)
    key = mask_key(fingerprint, density, rule, corpus_hash(texts), num_sequences, seq_len,
                   kind, extra)
    cached = cache_dir() / "masks" / f"{key}.safetensors"
    if cached.is_file():
        mask = SparseMask.load(cached)
        mask.check_model(params, fingerprint)
        return mask, f"cache {cached.name}" + _what(mask, kind)
    mask = make_mask_of_kind(float32_twin(model, model_name), tokenizer, kind, texts,
                             model_name=model_name, density=density, rule=rule, corpus=corpus,
                             num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                             task_texts=task_texts, client_texts=client_texts,
                             fingerprint=fingerprint, quiet=quiet, examples=examples,
                             label_words=label_words)
    mask.save(cached)
    return mask, f"computed, cached as {cached.name}" + _what(mask, kind)


def float32_twin(model, model_name: str):
    """The model whose gradients choose the mask: `model` itself in float32, else a float32
    load of the same checkpoint (dropped after the mask is computed), so the mask never
    depends on the inference dtype and fp32 and bf16 runs share one cache entry (their
    fingerprints agree by design). Measured on SmolLM2: a calibration mask from bf16
    gradients shared 18% of the fp32 one's coordinates, one from fp32 gradients of the
    bf16-rounded weights 69%: top-k at 0.1% turns on small differences. Costs a float32 copy
    of the model on its device while the mask is computed, once per cache key."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    device = next(model.parameters()).device
    twin, _ = load_model(model_name, dtype="float32", device=str(device))
    return twin


def _what(mask: SparseMask, kind: str) -> str:
    return "" if kind == "calibration" else f" ({describe_mask(mask)})"
