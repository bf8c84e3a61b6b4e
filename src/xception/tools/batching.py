"""The model side of `xception serve` (tools/serve.py is the HTTP side): decoding an uploaded image exactly as
`xception predict` decodes a file (`pil_eval(...).load_bytes`), refusing what must not be decoded, and the one
model thread that runs the requests arriving together as one batch (`Batcher`)."""

from __future__ import annotations

import io
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from ..data import to_device
from .predict import top_results

MAX_PIXELS = 64_000_000  # an image whose header claims more is refused before decoding (413)


class Refused(Exception):
    """A request the server will not answer with a prediction: its HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def decode(transform, data: bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An uploaded image's bytes -> the eval-transformed 3xHxW uint8 tensor, as predict makes it from a file.
    The size in the header is checked first, so a decompression bomb is refused without being decoded."""
    if not data:
        raise Refused(400, "empty body: send the image's bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Refused(413, f"image too large to decode ({first_line(e)})")
    except UnidentifiedImageError:
        raise Refused(400, "not an image Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF, ...)")
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error ... on bad headers
        raise Refused(400, f"cannot read the image header ({first_line(e)})")
    if width * height > max_pixels:
        raise Refused(413, f"image of {width}x{height} pixels is over the server's limit of {max_pixels} pixels")
    try:
        return transform.load_bytes(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Refused(413, f"image too large to decode ({first_line(e)})")
    except Exception as e:  # a truncated or corrupt file: OSError, ValueError, SyntaxError, ...
        raise Refused(400, f"cannot decode the image ({first_line(e)})")


@dataclass
class _Job:
    image: torch.Tensor
    topk: int
    future: Future


class Batcher:
    """The one thread that runs the model. `load()` -> Predictor runs on it first, then one warm-up batch;
    `ready` is set after both (and `transform`, the eval transform to decode uploads with). Jobs submitted
    meanwhile wait in the queue. `stop()` lets it answer what is queued, then ends it."""

    def __init__(self, load, device, max_batch: int, max_wait_ms: float, log=print, on_failure=None):
        self.load, self.device, self.log, self.on_failure = load, device, log, on_failure
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.jobs: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.predictor = None
        self.transform = None  # the predictor's eval transform, for the request threads to decode with
        self.failed: Exception | None = None
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "in_flight": 0}
        self.thread = threading.Thread(target=self._main, name="xception-serve-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def submit(self, image: torch.Tensor, topk: int) -> Future:
        job = _Job(image, topk, Future())
        self.jobs.put(job)
        return job.future

    def _main(self) -> None:
        try:
            started = time.perf_counter()
            self.predictor = p = self.load()
            self.transform = p.transform()
            with torch.inference_mode():
                p.model(to_device(torch.zeros(1, 3, p.image_size, p.image_size, dtype=torch.uint8), self.device,
                                  channels_last=False))
        except Exception as e:  # UserError (a bad weights file) or anything else: the server cannot serve
            self.failed = e
            if self.on_failure:
                self.on_failure(e)
            self._drain_failed(e)
            return
        self.ready.set()
        self.log(f"xception serve: ready (loaded and warmed up in {time.perf_counter() - started:.1f} s)")
        while True:
            batch, stopping = self._collect()
            if batch:
                self._run(batch)
            if stopping:
                return

    def _collect(self) -> tuple:
        """([jobs] for one forward pass, whether stop() was called): the first job waited for, then those
        arriving within max_wait of it, up to max_batch."""
        first = self.jobs.get()
        if first is None:
            return [], True
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self, batch: list) -> None:
        p = self.predictor
        try:
            with torch.inference_mode():
                images = to_device(torch.stack([j.image for j in batch]), self.device, channels_last=False)
                logits = p.model(images)
            k = min(max(j.topk for j in batch), len(p.class_names))
            answers = top_results(p, logits, k)
        except Exception as e:  # a failed forward pass fails its requests (500), not the server
            for j in batch:
                j.future.set_exception(e)
            return
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        for j, answer in zip(batch, answers):
            answer["top"] = answer["top"][:j.topk]
            j.future.set_result((answer, len(batch)))

    def _drain_failed(self, error: Exception) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.set_exception(error)
