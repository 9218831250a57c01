"""Device and precision choices, kept out of the model."""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch

from nanophi.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    return torch.device(name)


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tiles (Intel Sapphire Rapids and later), where bf16 matmuls run ~6x faster
    than fp32 even at the small shapes of a CPU-sized GPT (docs/experiments.md, 2026-11-28)."""
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16", False))
    except (AttributeError, RuntimeError):  # older torch: no capability query
        return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPUs that support it and on CPUs with AMX, fp32 elsewhere. On CPUs with AVX512-BF16 but
    no AMX bf16 matmuls gain too little to pay for the casts, and on CPUs without either they run dozens of times
    slower than fp32, so there bf16 is opt-in (`--dtype bfloat16`)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_amx_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed precision around the forward pass; a no-op for fp32. Weights and optimizer state stay fp32.
    (On CPU the model's attention keeps itself in fp32 when a backward follows: see CausalSelfAttention.)"""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
