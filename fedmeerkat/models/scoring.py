"""Prompt-based classification with label words (MeZO style), computed cheaply.

The loss is the cross-entropy over the label words' logits at the answer position (the last
prompt token). Only those C logits are computed: the decoder's hidden state at that position
times the C matching rows of the LM head, not the full vocabulary at every position.

`loss="centered-ce"` first subtracts each label word's batch mean from its logits: a shift of
every example's scores by the same vector (a change of calibration alone) then leaves the loss
unchanged, so its gradient is the part of the cross-entropy's that separates the batch's
examples, the part a threshold-free metric (ROC-AUC) moves with. For a ZO step that matters:
the uploaded scalar no longer carries the calibration direction, which moves no ranking but
adds to every step's noise. Measured against plain CE in the learning benchmark
(`rt-central-loss`, README): no better at every seed, so "ce" stays the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedmeerkat.options import InputError

LOSSES = ("ce", "centered-ce")


def label_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce",
               reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of [B, C] label-word logits; "centered-ce" on logits minus their batch
    mean per label word (invariant to one shift of every row; a batch of one is constant)."""
    if kind == "centered-ce":
        logits = logits - logits.mean(0, keepdim=True)
    elif kind != "ce":
        raise ValueError(f"loss: expected one of {LOSSES}, got {kind!r}")
    return F.cross_entropy(logits, labels, reduction=reduction)


class LabelWordError(InputError):
    """A label word that does not map to exactly one token."""


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
    """One token id per label word; refuses words that are several tokens (or none)."""
    ids = []
    for word in label_words:
        toks = tokenizer(word, add_special_tokens=False).input_ids
        if len(toks) != 1:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise LabelWordError(
                f"label word {word!r} is {len(toks)} tokens {pieces} for this tokenizer; "
                "choose a single-token word (mind the leading space)"
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise LabelWordError(f"label words {list(label_words)} map to repeated token ids {ids}")
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Tokenize once, up front. Truncation policy: keep the LAST max_length tokens.

    The answer position is the end of the prompt, and templates put their question there, so
    the start of the text is what gets cut. A leading BOS token, if the tokenizer adds one,
    is kept.
    """
    out: list[list[int]] = []
    if not prompts:  # an empty split (no validation set): fast tokenizers fail on []
        return out
    bos = tokenizer.bos_token_id
    for ids in tokenizer(list(prompts), add_special_tokens=True).input_ids:
        if len(ids) > max_length:
            keep_bos = bos is not None and ids[0] == bos
            ids = ([bos] if keep_bos else []) + ids[len(ids) - max_length + int(keep_bos):]
        out.append(ids)
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor  # index of the answer position per row
    labels: torch.Tensor


class LabelScorer:
    """Scores prompts against a task's label words with a causal LM."""

    def __init__(self, model, tokenizer, label_words: Sequence[str], loss: str = "ce"):
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        self.loss_kind = loss  # the training loss; evaluation always reports plain CE
        self.model = model
        self.label_ids = label_token_ids(tokenizer, label_words)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.decoder = model.get_decoder()
        head = model.get_output_embeddings()
        self._head_weight = head.weight
        self._head_bias = getattr(head, "bias", None)
        self._label_index = torch.tensor(self.label_ids, device=head.weight.device)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.device = head.weight.device

    def collate(self, encoded: Sequence[Sequence[int]], labels: Sequence[int] | np.ndarray) -> Batch:
        """Right-pad a batch; the answer position is each row's last real token."""
        lengths = [len(x) for x in encoded]
        width = max(lengths)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, x in enumerate(encoded):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            att[i, : len(x)] = 1
        return Batch(
            ids.to(self.device),
            att.to(self.device),
            torch.tensor(lengths, device=self.device) - 1,
            torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device),
        )

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """[B, C] logits of the label words at the answer position, in float32."""
        return self._logits(batch)

    def _logits(self, batch: Batch) -> torch.Tensor:
        hidden = self.decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last]
        w = self._head_weight.index_select(0, self._label_index)
        # the two head rows in float32 whatever the model's dtype: a bf16 logit near 16 has a
        # spacing of 0.06, coarser than what eps*z changes in it (the same ops for fp32 models)
        out = h.float() @ w.float().T
        if self._head_bias is not None:
            out = out + self._head_bias.index_select(0, self._label_index).float()
        if self.softcap:  # Gemma-2 style final logit soft-capping
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def loss(self, batch: Batch) -> float:
        return float(label_loss(self.logits(batch), batch.labels, self.loss_kind))

    def example_losses(self, batch: Batch) -> np.ndarray:
        """Each example's loss (float64), from the same forward as `loss` (the DP step's
        per-example terms; config refuses a centered loss there, whose terms share the batch)."""
        return label_loss(self.logits(batch), batch.labels, self.loss_kind,
                          reduction="none").double().cpu().numpy()

    def loss_tensor(self, batch: Batch) -> torch.Tensor:
        """The same loss with the autograd graph kept (first-order baselines)."""
        return label_loss(self._logits(batch), batch.labels, self.loss_kind)


def sample_centered_loss(scorer: LabelScorer, batches: Sequence[Batch]):
    """A loss for one of `batches` (graph kept): the cross-entropy of its label logits minus
    the mean label logits over all of `batches`, held fixed. Per example, unlike
    "centered-ce" (whose center is the batch's own): what ranks one example against the
    sample with the calibration shift taken out. The task-gradient mask kind ranks weights by
    it (runners/masks.py); benchmarks/noise_scale.py measures its mean gradient."""
    with torch.no_grad():
        center = torch.cat([scorer.logits(b) for b in batches]).mean(0)
    return lambda batch: label_loss(scorer._logits(batch) - center, batch.labels)


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    predicted_share: list[float]  # share of examples predicted as each class (bias check)
    num_examples: int
    # threshold-free metrics (`label_metrics`): None where undefined (see there)
    auc: float | None = None
    macro_f1: float | None = None
    best_shift_accuracy: float | None = None
    # the label-word logits [n, C] (float32) and labels [n] they were computed from, in the
    # order of the evaluated examples; not written to metrics files (a deployed site sends
    # them so the server computes the metrics above exactly over all sites)
    logits: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    def metrics(self, prefix: str = "test_") -> dict[str, float | None]:
        """{prefix+name: value} of the threshold-free metrics (for metrics.jsonl)."""
        return {f"{prefix}auc": self.auc, f"{prefix}macro_f1": self.macro_f1,
                f"{prefix}best_shift_accuracy": self.best_shift_accuracy}


# ---- threshold-free metrics ----------------------------------------------------------------
# Accuracy is argmax over the label words' logits, so it moves with any shift of one label
# word's logit against the others: a fine-tune that only recalibrates that bias raises it. The
# three metrics below tell learning from recalibration:
#   - ROC-AUC (two classes): of the margin logit[1] - logit[0]; invariant to every shift.
#   - macro-F1: mean over classes of F1 of the argmax predictions; a model that answers one
#     class for everything scores low even where that class dominates.
#   - best-shift accuracy (two classes): the accuracy of argmax after the single additive
#     shift of the margin (a bias on logit[1] - logit[0]) that is best ON THE EVALUATED SET
#     itself, i.e. the accuracy that recalibration alone could reach. A gain in plain accuracy
#     with no gain here is recalibration; with more than two classes a "shift" is a (C-1)-dim
#     bias vector whose exact optimum is a search over an arrangement of hyperplanes, so it is
#     not computed (None).

def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie), labels in {0, 1}
    (1 = positive); exact, from average ranks (Mann-Whitney U). None when one class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be equal-length vectors")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("roc_auc needs labels in {0, 1}")
    pos = int((y == 1).sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank of each run of equal scores (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[y == 1].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


def macro_f1(pred: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
             num_classes: int) -> float:
    """Mean F1 = 2TP / (2TP + FP + FN) over the classes that occur in `labels` or `pred`
    (a class absent from both has no defined F1 and is left out, as scikit-learn does)."""
    p, y = np.asarray(pred), np.asarray(labels)
    if p.shape != y.shape or len(y) == 0:
        raise ValueError("pred and labels must be equal-length and non-empty")
    f1 = []
    for c in range(num_classes):
        tp = int(((p == c) & (y == c)).sum())
        fp = int(((p == c) & (y != c)).sum())
        fn = int(((p != c) & (y == c)).sum())
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def best_shift_accuracy(margins: Sequence[float] | np.ndarray,
                        labels: Sequence[int] | np.ndarray) -> float:
    """Two classes: max over thresholds tau of the accuracy of "class 1 iff margin > tau",
    i.e. of argmax after adding one bias to the margin logit[1] - logit[0]. Exact: every cut
    between consecutive distinct margins, and the two cuts that predict one class for all
    (tied margins always fall on the same side)."""
    m = np.asarray(margins, dtype=np.float64)
    y = np.asarray(labels)
    if m.shape != y.shape or m.ndim != 1 or len(m) == 0:
        raise ValueError("margins and labels must be equal-length non-empty vectors")
    order = np.argsort(m, kind="stable")
    ys, ms = y[order], m[order]
    # cut after position i (0..n): the first i examples predicted 0, the rest 1
    zeros_below = np.r_[0, np.cumsum(ys == 0)]
    ones_above = np.r_[np.cumsum((ys == 1)[::-1])[::-1], 0]
    correct = zeros_below + ones_above
    # a cut is allowed only where the margin changes (or at either end)
    allowed = np.r_[True, ms[1:] != ms[:-1], True]
    return float(correct[allowed].max() / len(m))


def label_metrics(logits: np.ndarray, labels: Sequence[int] | np.ndarray) -> dict[str, float | None]:
    """{"auc", "macro_f1", "best_shift_accuracy"} of label-word logits [n, C]; the first and
    the last are None unless C == 2 (and AUC also when only one class is present)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"logits {z.shape} and labels {y.shape} do not match")
    out: dict[str, float | None] = {
        "auc": None, "macro_f1": macro_f1(z.argmax(axis=1), y, z.shape[1]),
        "best_shift_accuracy": None}
    if z.shape[1] == 2:
        margin = z[:, 1] - z[:, 0]
        out["auc"] = roc_auc(margin, y)
        out["best_shift_accuracy"] = best_shift_accuracy(margin, y)
    return out


def format_metrics(record: dict, prefix: str = "test_") -> str:
    """'AUC 0.7120, macro-F1 0.6550, best-shift acc 0.6900' from a record's prefixed entries
    (those that are None or absent are left out)."""
    names = {"auc": "AUC", "macro_f1": "macro-F1", "best_shift_accuracy": "best-shift acc"}
    return ", ".join(f"{label} {record[prefix + k]:.4f}" for k, label in names.items()
                     if record.get(prefix + k) is not None)


def evaluate(
    scorer: LabelScorer,
    encoded: Sequence[Sequence[int]],
    labels: Sequence[int] | np.ndarray,
    batch_size: int = 32,
) -> EvalResult:
    if len(encoded) == 0:
        raise ValueError("cannot evaluate on an empty split")
    # Sort by length so padding is small; results are order-independent.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    correct, loss_sum = 0, 0.0
    counts = np.zeros(len(scorer.label_ids), dtype=np.int64)
    all_logits = np.zeros((len(encoded), len(scorer.label_ids)), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = scorer.collate([encoded[i] for i in idx], [labels[i] for i in idx])
        logits = scorer.logits(batch)
        pred = logits.argmax(dim=1)
        correct += int((pred == batch.labels).sum())
        loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        counts += np.bincount(pred.cpu().numpy(), minlength=len(counts))
        all_logits[idx] = logits.cpu().numpy()
    n = len(encoded)
    y = np.asarray(labels, dtype=np.int64)
    return EvalResult(correct / n, loss_sum / n, (counts / n).tolist(), n,
                      **label_metrics(all_logits, y), logits=all_logits, labels=y)


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token LM loss of one unpadded sequence (mask calibration); keeps the graph."""
    ids = input_ids.reshape(1, -1).to(model.get_output_embeddings().weight.device)
    return model(input_ids=ids, labels=ids, use_cache=False).loss
