"""Label-word scoring on a tiny random Llama: cheap logits equal the full model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmeerkat.models.scoring import (
    LabelScorer,
    LabelWordError,
    encode_prompts,
    evaluate,
    label_loss,
    label_token_ids,
    sample_centered_loss,
)
from fedmeerkat.models.tiny import tiny_llama
from tests.conftest import WORDS


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_words=list(WORDS), seed=3)


def test_label_words_must_be_single_distinct_tokens(tiny):
    _, tok = tiny
    assert len(label_token_ids(tok, [" bad", " good"])) == 2
    with pytest.raises(LabelWordError, match="2 tokens"):
        label_token_ids(tok, [" bad", " very good"])
    with pytest.raises(LabelWordError, match="repeated"):
        label_token_ids(tok, [" good", "good"])


def test_answer_position_logits_equal_full_model_logits(tiny):
    model, tok = tiny
    scorer = LabelScorer(model, tok, [" terrible", " great"])
    prompts = ["the movie was", "a very good film and the plot was fun it was", "it was"]
    ids = encode_prompts(tok, prompts, 64)
    batch = scorer.collate(ids, [0, 1, 1])
    got = scorer.logits(batch)
    for i, x in enumerate(ids):  # each prompt alone, unpadded, full vocabulary
        with torch.no_grad():
            full = model(input_ids=torch.tensor([x])).logits[0, -1]
        assert torch.allclose(got[i], full[scorer.label_ids], atol=1e-5)
    want = F.cross_entropy(got, torch.tensor([0, 1, 1]))
    assert scorer.loss(batch) == pytest.approx(float(want))
    res = evaluate(scorer, ids, [0, 1, 1], batch_size=2)
    pred = got.argmax(1)
    assert res.accuracy == pytest.approx(float((pred == torch.tensor([0, 1, 1])).float().mean()))
    assert sum(res.predicted_share) == pytest.approx(1.0)


def test_truncation_keeps_the_end_and_bos(tiny):
    _, tok = tiny
    long = " ".join(["film"] * 50) + " it was"
    (ids,) = encode_prompts(tok, [long], 8)
    full = tok(long).input_ids
    assert len(ids) == 8 and ids[-6:] == full[-6:]
    if tok.bos_token_id is not None and full[0] == tok.bos_token_id:
        assert ids[0] == tok.bos_token_id


def test_centered_loss_ignores_a_calibration_shift_and_ce_does_not():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    shift = torch.tensor([2.0, -1.0, 0.5])  # the same vector added to every example's scores
    for reduction in ("mean", "none"):
        assert torch.allclose(label_loss(logits + shift, labels, "centered-ce", reduction),
                              label_loss(logits, labels, "centered-ce", reduction), atol=1e-6)
    assert not torch.allclose(label_loss(logits + shift, labels), label_loss(logits, labels))
    # on logits whose batch mean is already zero it is the cross-entropy
    zero_mean = logits - logits.mean(0)
    assert torch.allclose(label_loss(zero_mean, labels, "centered-ce"),
                          F.cross_entropy(zero_mean, labels))
    with pytest.raises(ValueError, match="loss: expected one of"):
        label_loss(logits, labels, "hinge")


def test_the_scorer_trains_on_its_configured_loss(tiny):
    model, tok = tiny
    ids = encode_prompts(tok, ["the movie was", "a very good film it was", "it was dull"], 64)
    logits, got = None, {}
    for kind in ("ce", "centered-ce"):
        scorer = LabelScorer(model, tok, [" terrible", " great"], loss=kind)
        batch = scorer.collate(ids, [0, 1, 0])
        logits = scorer.logits(batch)
        want = label_loss(logits, batch.labels, kind)
        got[kind] = scorer.loss(batch)
        assert got[kind] == pytest.approx(float(want), abs=1e-6)
        assert float(scorer.loss_tensor(batch)) == pytest.approx(float(want), abs=1e-6)
        assert scorer.example_losses(batch).mean() == pytest.approx(float(want), abs=1e-6)
    assert abs(got["ce"] - got["centered-ce"]) > 1e-4  # the kind changes what is trained
    # evaluation reports plain cross-entropy whatever the training loss
    res = evaluate(scorer, ids, [0, 1, 0])
    assert res.loss == pytest.approx(float(F.cross_entropy(logits, torch.tensor([0, 1, 0]))),
                                     abs=1e-5)
    with pytest.raises(ValueError, match="loss: expected one of"):
        LabelScorer(model, tok, [" terrible", " great"], loss="hinge")


def test_the_run_config_sets_the_training_loss(tiny_model_dir, sentiment_csv):
    from fedmeerkat.config import ConfigError, build_config
    from fedmeerkat.runners.prepare import prepare

    base = {"model": tiny_model_dir, "task": "local", "data_files": sentiment_csv,
            "template": "{sentence} so it was", "label_words": [" bad", " good"]}
    assert prepare(build_config(base)).scorer.loss_kind == "ce"
    assert prepare(build_config({**base, "loss": "centered-ce"})).scorer.loss_kind == "centered-ce"
    with pytest.raises(ConfigError, match="centered-ce needs batch_size >= 2"):
        build_config({**base, "loss": "centered-ce", "batch_size": 1})


def test_sample_centered_loss_centers_each_example_on_the_whole_sample(tiny):
    model, tok = tiny
    scorer = LabelScorer(model, tok, [" terrible", " great"])
    ids = encode_prompts(tok, ["the movie was", "a very good film it was", "it was dull"], 64)
    batches = [scorer.collate([x], [y]) for x, y in zip(ids, [0, 1, 0], strict=True)]
    loss = sample_centered_loss(scorer, batches)
    logits = torch.cat([scorer.logits(b) for b in batches])
    centered = logits - logits.mean(0)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        assert loss(batches[0]).requires_grad  # a mask's backward needs the graph
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    for i, b in enumerate(batches):
        got = loss(b)
        want = F.cross_entropy(centered[i:i + 1], b.labels)
        assert float(got) == pytest.approx(float(want), abs=1e-5)
        # not the batch-centered loss, which a batch of one makes constant
        assert float(got) != pytest.approx(float(label_loss(logits[i:i + 1], b.labels,
                                                            "centered-ce")), abs=1e-4)
