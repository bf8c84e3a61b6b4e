"""Xception (Chollet 2017), laid out as the paper's Figure 5: entry flow, middle flow, exit flow.

Every convolution is followed by BatchNorm, so no convolution has a bias. A "separable
convolution" is a depthwise 3x3 followed directly by a pointwise 1x1, with nothing in between.

Two numeric conventions exist for the same weights:

* PyTorch/timm (default): BatchNorm eps 1e-5, max-pools padded by 1 on both sides. Weights ported by
  timm/Cadene compute exactly what timm computes.
* Keras (``keras_exact=True``): BatchNorm eps 1e-3, max-pools padded like TensorFlow's "same" (on an
  even-sized map, 0 before and 1 after). The author's Keras weights compute exactly what Keras computes.

Initialisation (see README): convolutions are Kaiming-normal with fan-in and ReLU gain, which keeps the
signal's variance through the ReLUs and counts a depthwise kernel's real 9 inputs (a fan-out rule would
count every channel and start those weights ~30x too small: BatchNorm then turns them into huge effective
learning rates). Every BatchNorm starts at identity (gamma 1, beta 0), as in Keras. We measured and
rejected zero-initialised residual gammas (Goyal et al. 2017): in Xception they cut the whole residual
path at the start, and on the digits demo (2 epochs, one-cycle lr 0.05) val top-1 fell from 97.5% to
72%. The classifier starts at N(0, 0.01) with zero bias, so the first logits are near zero and the first
loss is near ln(classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MIN_INPUT_SIZE

BN_EPS = {False: 1e-5, True: 1e-3}  # keras_exact -> BatchNorm epsilon (PyTorch/timm, Keras)


class SamePadMaxPool(nn.Module):
    """3x3/2 max-pool with TensorFlow "same" padding: the extra pixel goes after, not before."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((-(-size // self.stride) - 1) * self.stride + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        # -inf padding: a padded pixel must never win the max.
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), self.kernel_size, self.stride)


def max_pool(keras_exact: bool) -> nn.Module:
    return SamePadMaxPool() if keras_exact else nn.MaxPool2d(3, stride=2, padding=1)


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, no bias, no normalisation or activation in between."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)


class SepConvBN(nn.Sequential):
    """[ReLU] -> SeparableConv -> BN: the unit every residual block repeats."""

    def __init__(self, in_channels: int, out_channels: int, relu_first: bool, bn_eps: float,
                 inplace: bool = True):
        super().__init__()
        if relu_first:
            # A block's first ReLU must not work in place: the shortcut still needs its input.
            self.relu = nn.ReLU(inplace=inplace)
        self.conv = SeparableConv2d(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)


class DownBlock(nn.Module):
    """Entry/exit-flow block: two SepConvBN units and a 3x3/2 max-pool, with a strided 1x1 conv+BN shortcut."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, first_relu: bool,
                 bn_eps: float, keras_exact: bool):
        super().__init__()
        self.sep1 = SepConvBN(in_channels, mid_channels, relu_first=first_relu, bn_eps=bn_eps,
                              inplace=False)
        self.sep2 = SepConvBN(mid_channels, out_channels, relu_first=True, bn_eps=bn_eps)
        self.pool = max_pool(keras_exact)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
            nn.BatchNorm2d(out_channels, eps=bn_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.sep2(self.sep1(x))) + self.shortcut(x)


class MiddleBlock(nn.Module):
    """Middle-flow block: three ReLU-SepConv728-BN units with an identity shortcut."""

    def __init__(self, channels: int, bn_eps: float):
        super().__init__()
        self.body = nn.Sequential(*(SepConvBN(channels, channels, relu_first=True, bn_eps=bn_eps,
                                              inplace=i > 0) for i in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


def conv_bn_relu(in_channels: int, out_channels: int, stride: int, bn_eps: float) -> nn.Sequential:
    """The stem's plain 3x3 convolutions: no padding, as in the paper."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
        nn.ReLU(inplace=True),
    )


def sep_bn_relu(in_channels: int, out_channels: int, bn_eps: float) -> nn.Sequential:
    """The exit flow's last two separable convolutions, each followed by BN and ReLU."""
    return nn.Sequential(
        SeparableConv2d(in_channels, out_channels),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
        nn.ReLU(inplace=True),
    )


class Xception(nn.Module):
    """Xception for ``num_classes`` classes; input at least 71x71, scaled to [-1, 1]."""

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, in_chans: int = 3,
                 keras_exact: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_classes, self.drop_rate, self.keras_exact = num_classes, drop_rate, keras_exact
        eps = BN_EPS[keras_exact]
        self.num_features = 2048

        self.entry_flow = nn.Sequential(
            conv_bn_relu(in_chans, 32, stride=2, bn_eps=eps),
            conv_bn_relu(32, 64, stride=1, bn_eps=eps),
            DownBlock(64, 128, 128, first_relu=False, bn_eps=eps, keras_exact=keras_exact),
            DownBlock(128, 256, 256, first_relu=True, bn_eps=eps, keras_exact=keras_exact),
            DownBlock(256, 728, 728, first_relu=True, bn_eps=eps, keras_exact=keras_exact),
        )
        self.middle_flow = nn.Sequential(*(MiddleBlock(728, bn_eps=eps) for _ in range(8)))
        self.exit_flow = nn.Sequential(
            DownBlock(728, 728, 1024, first_relu=True, bn_eps=eps, keras_exact=keras_exact),
            sep_bn_relu(1024, 1536, bn_eps=eps),
            sep_bn_relu(1536, 2048, bn_eps=eps),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one for ``num_classes`` (fine-tuning)."""
        device = self.fc.weight.device if hasattr(self, "fc") else None
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, device=device)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"Xception needs an input of shape (N, C, H, W) with H and W at least "
                             f"{MIN_INPUT_SIZE}, got {tuple(x.shape)}")
        return self.exit_flow(self.middle_flow(self.entry_flow(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.global_pool(features), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_keras_exact(self, exact: bool) -> None:
        """Switch the numerics in place (BatchNorm eps, max-pool padding); no weight changes."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = BN_EPS[exact]
            if isinstance(m, DownBlock):
                m.pool = max_pool(exact)
        self.keras_exact = exact
