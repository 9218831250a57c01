"""Model FLOPs utilisation: the device's peak FLOP/s for a dtype, from a table of GPUs or a measured probe.

    flops_per_s, source = peak_flops(torch.device("cuda"), torch.bfloat16)  # (989e12, "table: H100 SXM bf16")
    mfu = model.flops_per_token() * tokens_per_s / flops_per_s

nanoGPT divides by the A100's bf16 peak whatever the device, so its MFU is wrong on every other GPU and on CPUs.
Here known GPUs come from their datasheets (dense tensor-core numbers: no 2:4 sparsity), matched on
`torch.cuda.get_device_name`; CPUs and unknown GPUs get a short matmul probe at the run's dtype, which measures
what this machine, with this thread count, actually reaches. The probe is cached per (device, dtype) in-process.
"""

from __future__ import annotations

import logging
import re
import time

import torch

log = logging.getLogger(__name__)

TERA = 1e12
# Probe: square matmuls of this size, repeated for about this long, keeping the best of a few windows
# (the peak, not the mean: other processes on a shared machine only ever make it slower).
PROBE_SIZE = 1024
PROBE_SECONDS = 0.5
PROBE_WINDOWS = 5

# (pattern on the device name, label, {dtype: dense peak TFLOP/s}). Order matters: first match wins, so
# "A100" precedes "A10" and the H100 variants precede plain H100. "tf32" is fp32 matmul on tensor cores.
# Sources: NVIDIA datasheets (A100, H100, H200, L4, A10, T4, V100; GeForce Ampere/Ada whitepapers for
# RTX 3090/4090, whose fp16/bf16 rates are with fp32 accumulation, which is what PyTorch uses).
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"H200", "H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"A10G", "A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    (r"A10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"L4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"T4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),  # Turing: no bf16 or tf32 tensor cores
    (r"V100.*PCIe", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),  # Volta: no bf16 or tf32 tensor cores
    (r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
]

DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_probe_cache: dict[tuple[str, torch.dtype], float] = {}


def table_peak(device_name: str, dtype: torch.dtype, tf32: bool = False) -> tuple[float, str] | None:
    """(FLOP/s, label) from the GPU table for `device_name`, or None when the name or the dtype is not in it.
    With `tf32`, fp32 matmuls run on tensor cores (torch.backends.cuda.matmul.allow_tf32), so that peak applies."""
    key = DTYPE_KEYS.get(dtype)
    if key is None:
        return None
    if key == "fp32" and tf32:
        key = "tf32"
    for pattern, label, peaks in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if key not in peaks:
                return None
            return peaks[key] * TERA, f"{label} {key}"
    return None


def measure_peak(device: torch.device, dtype: torch.dtype, size: int = PROBE_SIZE,
                 seconds: float = PROBE_SECONDS) -> float:
    """Best FLOP/s of (size x size) @ (size x size) matmuls at `dtype` on `device` over ~`seconds`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    flops = 2 * size**3
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first call pays for kernel selection and thread-pool start
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    window = seconds / PROBE_WINDOWS
    while time.perf_counter() < deadline:
        n, t0 = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            if device.type == "cuda" and n % 8:
                continue  # on GPUs sync only now and then, so launches queue up
            sync()
            if time.perf_counter() - t0 >= window:
                break
        best = max(best, n * flops / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str]:
    """The device's dense peak FLOP/s at `dtype` and where the number comes from:
    "table: H100 SXM bf16" for known GPUs, "measured: 1024x1024 matmul probe, bfloat16" otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = table_peak(name, dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
        if found is not None:
            return found[0], f"table: {found[1]}"
        log.info(f"{name} at {dtype} is not in nanophi.mfu.GPU_PEAKS; measuring its matmul peak instead")
    key = (str(device), dtype)
    if key not in _probe_cache:
        _probe_cache[key] = measure_peak(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    return _probe_cache[key], f"measured: {PROBE_SIZE}x{PROBE_SIZE} matmul probe, {dtype_name}"
