"""Numeric precision of a run: fp32, or autocast to fp16 (with a loss scaler) or bf16 (--amp)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    """Autocast dtype (None: fp32) and the fp16 loss scaler (None: no scaling)."""
    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    static_scale: float | None = None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]


def cpu_has_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_precision(cfg, device: torch.device, warn=print) -> Precision:
    """--amp: fp16 with a loss scaler on accelerators (static for a numeric --loss-scale), or bf16 without
    one (--amp-dtype bfloat16). A CPU without native bf16 runs fp32: emulated bf16 is ~200x slower."""
    if not cfg.amp:
        return Precision(device.type)
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    if device.type == "cpu":
        if not cpu_has_native_bf16():
            warn("warning: --amp ignored: this CPU has no native bfloat16 (it would run ~200x slower); "
                 "training in fp32")
            return Precision("cpu")
        return Precision("cpu", torch.bfloat16)  # fp16 autocast on CPU has no speed benefit
    if dtype == torch.bfloat16:
        return Precision(device.type, dtype)
    if cfg.loss_scale in (None, "dynamic"):
        return Precision(device.type, dtype, torch.amp.GradScaler(device.type))
    scale = float(cfg.loss_scale)
    # A static scale: the scaler still skips steps whose gradients overflow, but never changes the scale.
    return Precision(device.type, dtype, torch.amp.GradScaler(device.type, init_scale=scale), scale)
