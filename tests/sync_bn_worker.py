"""Run by test_distributed under torchrun: a few SGD steps of Xception in float64 on a fixed global batch.

With one process it trains on the whole batch with plain BatchNorm; with N it trains each rank on its
slice with our --sync-bn conversion and DistributedDataParallel, as `xception train` does. float64 keeps
rounding far below the 1e-5 tolerance, so a ReLU input a rounding error away from 0 cannot flip sides.
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from xception import Xception
from xception.checkpoint import unwrap
from xception.runtime import cleanup, convert_sync_batchnorm, setup


def main(out: str, steps: int = 3, batch: int = 8) -> None:
    ctx = setup("cpu")
    data = torch.Generator().manual_seed(0)
    images = torch.randn(steps, batch, 3, 71, 71, generator=data, dtype=torch.float64)
    labels = torch.randint(0, 2, (steps, batch), generator=data)
    torch.manual_seed(5)
    model = Xception(num_classes=2).double()
    # Non-zero BN gammas everywhere, so every layer's gradient is exercised from the first step.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    if ctx.distributed:
        model = DistributedDataParallel(convert_sync_batchnorm(model, ctx.device))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        x = images[step, ctx.rank::ctx.world_size]
        y = labels[step, ctx.rank::ctx.world_size]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if ctx.is_main:
        torch.save(unwrap(model).state_dict(), out)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
