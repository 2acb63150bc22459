"""LoRA-FedZO: Meerkat's sparse ZO protocol on LoRA adapters instead of masked weights.

References: E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022);
the Meerkat paper's LoRA-FedZO baseline (Sec. 3, Tables 15, 23; rank 16, alpha 16).

Adapter: peft `inject_adapter_in_model` with rank `lora_rank` (16) and `lora_alpha` (16), no
dropout, on every linear layer of the decoder blocks: q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj (Llama/Qwen2/Gemma names). This matches the paper's download: for Qwen2-1.5B
these seven projections at r=16 hold 18.46M values, 35.2 MiB in fp16 (Table 23: 35.22 MB); we
send float32, so twice that. A is initialised by peft (Kaiming-uniform) under a fork of the
torch RNG seeded from the run seed, B is zero (peft default; fine for ZO: the first step
perturbs A and B together).
The adapter surgery lives in models/lora.py. Space: a SparseMask whose tensors are the adapter's A/B matrices with ALL their indices
(density 1 over the adapter), so SparseView, zo_step, replay, the scalar aggregate and the wire
format apply unchanged; the downlink in sparse-weights mode is the adapter (float32).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmeerkat.federated.registry import Method, register
from fedmeerkat.federated.server import MeerkatServer
from fedmeerkat.options import setting


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape (also read by fedavg-backprop with trainable=lora)."""

    lora_rank: int = setting(16, "LoRA rank", min=1)
    lora_alpha: float = setting(16.0, "LoRA alpha", gt=0)


class LoraFedZOServer(MeerkatServer):
    """Meerkat's server, unchanged: the space (the adapter) is all that differs."""

    method = "lora-fedzo"


METHOD = register(Method(
    "lora-fedzo", server=LoraFedZOServer, settings=LoraSettings, order=4,
    space=lambda s: "lora", spaces=("lora",),
    summary="ZO on LoRA adapters (r=16, alpha=16)", reference="paper baseline"))
