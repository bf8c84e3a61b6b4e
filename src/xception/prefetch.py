"""Hide the host-to-device copy behind the training step: on CUDA, the next batch is copied on a side
stream while the current step runs, from the pinned memory the loader collated it into. Elsewhere the
loader is used as it is (on CPU there is no copy to hide)."""

from __future__ import annotations

import torch


def for_device(loader, device: torch.device):
    if loader is None or device.type != "cuda" or not torch.cuda.is_available():
        return loader
    return CudaPrefetcher(loader, device)


class CudaPrefetcher:
    """Wraps a loader of (images, targets, ...) batches; yields them already on `device`, with the
    uint8 images still uint8 (to_device converts, normalises and lays them out on the compute stream).
    Everything else (len, sampler, dataset, batch_size) is the wrapped loader's."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name in ("loader", "device"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _start(self, batch, stream):
        with torch.cuda.stream(stream):
            return tuple(x.to(self.device, non_blocking=True) if isinstance(x, torch.Tensor) else x
                         for x in batch)

    def __iter__(self):
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)
        try:
            ahead = self._start(next(batches), stream)
        except StopIteration:
            return
        while ahead is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)  # the copy has landed before the step reads it
            for x in ahead:
                if isinstance(x, torch.Tensor):
                    x.record_stream(current)  # its memory is not reused while the step still reads it
            ready = ahead
            try:
                ahead = self._start(next(batches), stream)  # queued now, runs during the step
            except StopIteration:
                ahead = None
            yield ready
