"""The weights the engine decodes with (`decode_copy`): on a CPU, linear weights transposed to (in, out)
(`StreamingLinear`), fbgemm's dynamic int8 (`quantize="int8"`) or weight-only 4-bit in GGUF Q4_1's layout
(`QuantLinear`, `quantize="int4"`); elsewhere copies in the matmul dtype. Decoding a few rows reads every weight
once per token, so the bytes per weight bound it; the residual stream, norms and embeddings stay fp32."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from nanophi.errors import UserError
from nanophi.model import GPT

log = logging.getLogger(__name__)

# --quantize choices, CPU decoding: "int8" fbgemm's dynamic int8 (fastest for batches), "int4" weight-only 4-bit
# `QuantLinear` (fastest for one stream; a Q4_1 GGUF's own codes).
QUANTIZE = (None, "int8", "int4")


class StreamingLinear(torch.nn.Module):
    """nn.Linear for decoding on a CPU: y = x @ W^T + b with W^T stored contiguous, (in, out).

    At one row per step the matmul is a matrix-vector product bound by reading the weights; BLAS streams an
    (in, out) matrix ~1.5x faster than nn.Linear's (out, in) one here (MKL, AVX2), and at many rows it is as fast."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def decode_copy(model: GPT, device: torch.device, dtype: torch.dtype, quantize: str | None = None) -> GPT:
    """The model the engine runs. On a GPU in fp32: the model itself. Otherwise a copy that shares every tensor
    with `model` except the linear layers' weights, which become
      - int8 (quantize="int8", CPU): torch's dynamically quantized Linear, per-channel weight scales;
      - int4 (quantize="int4", CPU): `QuantLinear`, 4-bit weights in groups of 32, bf16 products;
      - (in, out) fp32 StreamingLinear on a CPU;
      - `dtype` copies (bf16/fp16), for autocast to multiply without casting the weights every step.
    The output head is thereby untied from the embedding, which stays fp32, so the residual stream does too."""
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(q for q in QUANTIZE if q)}, got {quantize!r}")
    if quantize and (device.type != "cpu" or dtype != torch.float32):
        raise UserError(f"{quantize} quantization is a CPU option (torch's packed kernels) with the default "
                        "--dtype float32; drop --quantize or --dtype")
    if device.type != "cpu" and dtype == torch.float32:
        return model
    # deepcopy the module tree but not the tensors: the memo maps every parameter and buffer to itself
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    shadow = copy.deepcopy(model, memo)
    for module in shadow.modules():  # training-time diagnostics hooks stay with the training model
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    if quantize == "int8":
        return _quantize_int8(shadow)
    if quantize == "int4":
        return _quantize_int4(shadow)
    for module in list(shadow.modules()):
        for name, child in module.named_children():
            if not isinstance(child, torch.nn.Linear):
                continue
            if device.type == "cpu" and dtype == torch.float32:
                setattr(module, name, StreamingLinear(child))
            else:
                new = torch.nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                      device=child.weight.device, dtype=dtype)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
    return shadow.eval()


def quantize_q4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit quantization of w (N, K) in groups of `group` inputs, GGUF Q4_1's
    scheme: w ~ code * scale + lo with code in 0..15, lo the group's minimum and scale = (max - min) / 15.
    Returns codes (N, K) int32 and scale, lo (N, K / group) fp32. Weights dequantized from a Q4_1 file come back
    as exactly their own codes, because each Q4_1 group holds its min (code 0) and its max (code 15)."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_(min=1e-12)  # a constant group: every code 0, any scale
    codes = ((groups - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.int32)
    return codes.view(n, k), scale, lo


class QuantLinear(torch.nn.Module):
    """A weight-only quantized nn.Linear for decoding on a CPU (`quantize="int4"`): the weights are stored in 4
    or 8 bits and multiplied by torch's packed kernels, which read 8x or 4x fewer bytes than fp32 -- the bytes
    bound decoding one stream.

      - 4 bits: asymmetric, a scale and a zero per group of 32 inputs (`torch._weight_int4pack_mm_for_cpu`): the
        layout of GGUF's Q4_1, so a Q4_1 GGUF (SmolLM2's) is re-quantized to exactly its own 4-bit codes;
      - 8 bits (the output head): symmetric, one scale per output channel (`torch._weight_int8pack_mm`).

    Only the weights are quantized; the activations are not (fbgemm's dynamic int8 rounds them to 8 bits per
    call). The kernels' fast path on CPU is bf16 (AVX-512 BF16 / AMX), so the product runs in bf16 with fp32 in
    and out; the scales are rounded to bf16 too. The residual stream, norms and attention stay fp32."""

    GROUP = 32

    def __init__(self, linear: torch.nn.Linear, bits: int) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.bits = bits
        if bits == 4:
            codes, scale, lo = quantize_q4(w, self.GROUP)
            zero = lo + 8 * scale  # the kernel computes (code - 8) * scale + zero
            self.register_buffer("weight_q", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
            self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                                 .to(torch.bfloat16))  # (K / 32, N, 2)
        else:
            scale = (w.abs().amax(dim=1) / 127).clamp_(min=1e-12)
            self.register_buffer("weight_q", (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8))
            self.register_buffer("scale_zero", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    @classmethod
    def packs_int4(cls, linear: torch.nn.Linear) -> bool:
        """int4 needs whole groups of 32 inputs and the packing's tile of 16 outputs."""
        out_features, in_features = linear.weight.shape
        return in_features % cls.GROUP == 0 and out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 4:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight_q, self.GROUP, self.scale_zero)
        else:
            y = torch._weight_int8pack_mm(x2, self.weight_q, self.scale_zero)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _quantize_int8(shadow: GPT) -> GPT:
    """Replace the linear layers of `shadow` (whose tensors are shared with the caller's model: nothing is
    modified in place) by fbgemm's dynamic int8 Linear: weights int8 with a scale per output channel, activations
    quantized per call. Reads a quarter of fp32's bytes per token, which is what bounds decoding on a CPU."""
    import warnings

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise UserError("this torch has no torch.ao.quantization (dynamic int8); run without --quantize") from None
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UserError("int8 needs torch's fbgemm quantized kernels (x86 CPUs); run without --quantize")
    with warnings.catch_warnings():  # torch points eager-mode quantization users at torchao; it still works
        warnings.simplefilter("ignore")
        quantize_dynamic(shadow, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return shadow.eval()


def _quantize_int4(shadow: GPT) -> GPT:
    """Replace the linear layers of `shadow` (whose tensors are shared with the caller's model: nothing is
    modified in place) by weight-only 4-bit `QuantLinear`s. The output head gets 8 bits: it is the token
    embedding, which quantized GGUFs keep at 8 bits too (SmolLM2's is Q8_0), and its errors move every logit."""
    if not hasattr(torch, "_weight_int8pack_mm") or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise UserError("this torch has no packed int4 CPU kernels; run without --quantize or with int8")
    from nanophi.device import cpu_has_amx_bf16

    if not cpu_has_amx_bf16():  # the kernel's bf16 path is what makes int4 fast; elsewhere int8 usually wins
        log.warning("--quantize int4 multiplies in bf16, which this CPU has no AMX for: try --quantize int8 too")
    for module in list(shadow.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                bits = 4 if child is not shadow.lm_head and QuantLinear.packs_int4(child) else 8
                setattr(module, name, QuantLinear(child, bits))
    return shadow.eval()

