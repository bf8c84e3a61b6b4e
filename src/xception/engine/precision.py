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
        return Precision(device.type, dtype, grad_scaler(device.type, warn=warn))
    scale = float(cfg.loss_scale)
    # A static scale: the scaler still skips steps whose gradients overflow, but never changes the scale.
    return Precision(device.type, dtype, grad_scaler(device.type, init_scale=scale, warn=warn), scale)


def grad_scaler(device_type: str, warn=print, **kwargs) -> torch.amp.GradScaler:
    """torch's loss scaler; on NPU torch_npu's when it has one. An NPU in saturation mode clamps an
    overflow to the largest finite fp16 instead of producing inf, so gradients look finite and only the
    chip's overflow flag tells; torch_npu's scaler reads that flag, torch's cannot."""
    if device_type == "npu":
        import torch_npu  # present: the device resolved to "npu"

        scaler = getattr(getattr(torch_npu.npu, "amp", None), "GradScaler", None)
        if scaler is not None:
            return scaler(**kwargs)
        supports_inf = getattr(torch_npu.npu.utils, "is_support_inf_nan", lambda: True)()
        if not supports_inf:
            warn("warning: this NPU runs in saturation mode and torch_npu has no GradScaler: fp16 overflows "
                 "may go unnoticed; use --amp-dtype bfloat16 or a torch_npu with npu.amp.GradScaler")
    return torch.amp.GradScaler(device_type, **kwargs)
