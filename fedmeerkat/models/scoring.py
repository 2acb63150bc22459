"""Prompt-based classification with label words (MeZO style), computed cheaply.

The loss is the cross-entropy over the label words' logits at the answer position (the last
prompt token). Only those C logits are computed: the decoder's hidden state at that position
times the C matching rows of the LM head, not the full vocabulary at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedmeerkat.options import InputError


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
    out = []
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

    def __init__(self, model, tokenizer, label_words: Sequence[str]):
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
        out = (h @ w.T).float()
        if self._head_bias is not None:
            out = out + self._head_bias.index_select(0, self._label_index).float()
        if self.softcap:  # Gemma-2 style final logit soft-capping
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def loss(self, batch: Batch) -> float:
        return float(F.cross_entropy(self.logits(batch), batch.labels))

    def loss_tensor(self, batch: Batch) -> torch.Tensor:
        """The same loss with the autograd graph kept (first-order baselines)."""
        return F.cross_entropy(self._logits(batch), batch.labels)


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    predicted_share: list[float]  # share of examples predicted as each class (bias check)
    num_examples: int


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
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = scorer.collate([encoded[i] for i in idx], [labels[i] for i in idx])
        logits = scorer.logits(batch)
        pred = logits.argmax(dim=1)
        correct += int((pred == batch.labels).sum())
        loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        counts += np.bincount(pred.cpu().numpy(), minlength=len(counts))
    n = len(encoded)
    return EvalResult(correct / n, loss_sum / n, (counts / n).tolist(), n)


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token LM loss of one unpadded sequence (mask calibration); keeps the graph."""
    ids = input_ids.reshape(1, -1).to(model.get_output_embeddings().weight.device)
    return model(input_ids=ids, labels=ids, use_cache=False).loss
