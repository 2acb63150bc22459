"""LoRA model surgery: inject a seeded peft adapter, and the adapter as a trainable space.

Adapter: peft `inject_adapter_in_model` with rank `rank` and `alpha`, no dropout, on every
linear layer of the decoder blocks: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj (Llama/Qwen2/Gemma names). A is initialised by peft (Kaiming-uniform) under a fork of
the torch RNG seeded from the run seed, B is zero (peft default; fine for ZO: the first step
perturbs A and B together). The space is a SparseMask whose tensors are the adapter's A/B
matrices with ALL their indices, so every ZO tool applies unchanged. Lives with the models
(layer 2); the LoRA-FedZO method (federated/methods/lora_fedzo.py) only declares its server.
"""

from __future__ import annotations

import torch

from fedmeerkat.zo.mask import SparseMask
from fedmeerkat.zo.seeds import LORA_INIT, mix

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(*, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS):
    """The peft LoraConfig of the adapter (also what an exported adapter folder declares)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]  # peft takes floats
                      lora_dropout=0.0, target_modules=list(targets), bias="none")


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float, seed: int,
             targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Inject a LoRA adapter into `model` in place, deterministically from `seed`."""
    from peft import inject_adapter_in_model

    cfg = lora_config(rank=rank, alpha=alpha, targets=targets)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(mix(seed, LORA_INIT))
        inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            p.requires_grad_(False)


def lora_mask(model: torch.nn.Module, meta: dict[str, str] | None = None) -> SparseMask:
    """Every coordinate of every LoRA A/B matrix, in named_parameters() order."""
    named = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if not named:
        raise ValueError("the model holds no LoRA adapter (call add_lora first)")
    return SparseMask([n for n, _ in named], [torch.arange(p.numel()) for _, p in named],
                      [tuple(p.shape) for _, p in named], meta={"mask_kind": "lora", **(meta or {})})
