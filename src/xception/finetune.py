"""`--freeze-epochs K`: train only the classifier for the first K epochs, then the whole network.

While frozen, the backbone's weights do not move and its BatchNorm layers use their running statistics
(eval mode) and do not update them, so the new head learns on the features the pretrained weights give.
On one process the backbone's parameters also stop requiring gradients (no backward through it: much
faster). Under DistributedDataParallel the parameter set must not change after wrapping, so there the
gradients are still computed and all-reduced, and dropped right before each optimizer step.
"""

from __future__ import annotations

from .checkpoint import unwrap

HEAD_MODULES = ("fc", "dropout", "global_pool")


class HeadOnly:
    def __init__(self, model, optimizer, epochs: int, log=print):
        self.wrapped = model is not unwrap(model)
        self.inner = unwrap(model)
        self.optimizer, self.epochs, self.log = optimizer, epochs, log
        self.backbone = [p for name, p in self.inner.named_parameters()
                         if name.split(".")[0] not in HEAD_MODULES]
        self.handles = []

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""
        want = epoch < self.epochs
        if want and not self.active:
            self._freeze()
            span = f"epoch {epoch + 1}" if epoch + 1 == self.epochs else f"epochs {epoch + 1}-{self.epochs}"
            self.log(f"{span}: training only the classifier (backbone frozen, BatchNorm statistics fixed); "
                     f"the whole network trains from epoch {self.epochs + 1}")
        elif not want and self.active:
            self.unfreeze()
            if epoch == self.epochs:
                self.log(f"epoch {epoch + 1}: backbone unfrozen, training the whole network")

    def _freeze(self) -> None:
        def backbone_eval(module, inputs):
            for name, child in module.named_children():
                if name not in HEAD_MODULES:
                    child.eval()

        def drop_backbone_grads(optimizer, args, kwargs):
            for p in self.backbone:
                p.grad = None  # SGD skips a parameter without a gradient: no step, decay or momentum

        self.handles = [self.inner.register_forward_pre_hook(backbone_eval),
                        self.optimizer.register_step_pre_hook(drop_backbone_grads)]
        if not self.wrapped:
            for p in self.backbone:
                p.requires_grad_(False)

    def unfreeze(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for p in self.backbone:
            p.requires_grad_(True)
