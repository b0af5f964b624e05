"""Analytic training FLOPs of a generator flavor, and the accelerators' peak bf16 rates (for
MFU and capacity plans). The one definition that ``benchmarks/generator_scale.py``,
``benchmarks/gpu_step.py`` and ``expportrait plan`` use.

Per video token and layer, with d the width, f the FFN width, N video tokens and T context
tokens (multiply-add = 2 FLOPs)::

    self-attention   q, k, v, o projections 8d²      scores QKᵀ and AV   4Nd
    cross-attention  q, o projections       4d²      scores to T tokens  4Td   (+ k, v of the
                                                                           context: 4Td²/N)
    FFN              2 · 2·d·f = 4df
    forward / token ≈ L (12d² + 4df + 4Nd + 4Td) + patch/head

Training = 3 x forward (backward = 2 x forward: input and weight gradients) for a full
fine-tune; 2 x forward for a LoRA flavor (the frozen base needs input gradients only; the
adapters' weight gradients are left out). These are the model FLOPs that MFU counts (gradient
checkpointing's recomputed forward is not counted). The normal encoders' convolutions are left
out (≈ 1 % at 33x512² for wan1.3b; ``benchmarks/generator_scale.py`` checks the formula against
torch's ``FlopCounterMode``).
"""
from __future__ import annotations

from .flavors import PATCH, GeneratorFlavor, flavor, token_grid

#: dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets: H100 SXM5
#: 989.4 TF; H200 SXM (the same GH100 compute) 989.4 TF; A100 SXM4 312 TF
GPU_PEAK_BF16: dict[str, float] = {"h100": 989.4e12, "h200": 989.4e12, "a100": 312e12}


def analytic_forward_flops(name: str | GeneratorFlavor, frames: int, height: int, width: int) -> dict:
    """Forward FLOPs of one sample (DiT and the patch embedding / head): ``tokens``,
    ``per_token``, ``dit`` (the total) and ``attention_share`` (of a token's FLOPs)."""
    f = flavor(name) if isinstance(name, str) else name
    d, ffn, layers, text = f.dim, f.ffn_dim, f.num_layers, f.context_tokens
    t, h, w = token_grid(frames, height, width, f.latent_space)
    n = t * h * w
    per_token = layers * (12 * d * d + 4 * d * ffn + 4 * n * d + 4 * text * d)
    context_kv = layers * 4 * text * d * d
    patch = PATCH[0] * PATCH[1] * PATCH[2]
    patch_head = n * 2 * (f.in_channels * patch * d + d * f.latent_channels * patch)
    return {"tokens": n, "per_token": per_token, "dit": n * per_token + context_kv + patch_head,
            "attention_share": 4 * n * d / (12 * d * d + 4 * d * ffn + 4 * n * d + 4 * text * d)}


def training_flops(name: str | GeneratorFlavor, frames: int, height: int, width: int) -> float:
    """Model FLOPs of one training sample: 3 x the analytic forward (2 x for a LoRA flavor)."""
    f = flavor(name) if isinstance(name, str) else name
    return backward_factor(f) * analytic_forward_flops(f, frames, height, width)["dit"]


def backward_factor(f: GeneratorFlavor) -> float:
    """Training FLOPs / forward FLOPs: 3 (full fine-tune) or 2 (LoRA: no base weight gradients)."""
    return 2.0 if f.lora_rank > 0 else 3.0


def gpu_peak_bf16(name: str) -> float:
    """The peak of ``name`` (h100 | h200 | a100, any case); ValueError naming the known ones."""
    key = name.lower()
    if key not in GPU_PEAK_BF16:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPU_PEAK_BF16)}")
    return GPU_PEAK_BF16[key]
