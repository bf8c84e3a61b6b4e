"""`xception bench --mode serve --weights W`: a load test of `xception serve`.

Each server row starts `xception serve W` in a subprocess on 127.0.0.1 (a free port, read from its start-up
line), waits for /readyz, then lets --clients threads, each with its own keep-alive http.client connection,
POST images to /predict in a loop for --duration seconds, recording every request's latency, status and
X-Batch-Size. The rows: dynamic batching on (--max-batch, --max-wait-ms) and off (--max-batch 1), each
against a fresh server, stopped with SIGTERM (killed if it has not exited after a while) whatever happens;
then the no-server baseline: the same weights loaded once in this process, one image per forward pass
(decoded by the same eval transform, answered as predict answers), for the same duration.

The clients' own cost is reported too (this process's CPU time per request): on a small machine the load
generator shares the cores with the server, and the figure says how much of them it took.

The baseline loads and answers through tools/predict.py (load_predictor, the Predictor's transform,
top_results), the functions behind `xception predict` and `xception serve`, so all three rows run one path.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

from ..config import MIN_INPUT_SIZE, UserError
from ..data import to_device
from ..data.folder import IMG_EXTENSIONS
from ..runtime import resolve_device
from .predict import PredictOptions, load_predictor, top_results

HOST = "127.0.0.1"
READY_TIMEOUT = 300  # seconds for a server to load and warm up its model
STOP_TIMEOUT = 30  # seconds between SIGTERM and a kill
MAX_IMAGES = 32
MADE_UP_IMAGES = 8


def check_flags(args) -> None:
    """The serve mode's flags, each refused in one line naming it."""
    if not args.weights:
        raise UserError("--mode serve needs --weights W: a checkpoint or an .onnx from xception export")
    if not os.path.isfile(args.weights):
        raise UserError(f"--weights {args.weights}: no such file")
    for flag, value in (("--clients", args.clients), ("--max-batch", args.max_batch)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not 0 < args.duration <= 3600:
        raise UserError(f"--duration must be in (0, 3600] seconds, got {args.duration:g}")
    if not 0 <= args.max_wait_ms <= 10_000:
        raise UserError(f"--max-wait-ms must be in 0..10000, got {args.max_wait_ms:g}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.serve_image_size is not None and args.serve_image_size < MIN_INPUT_SIZE:
        raise UserError(f"--serve-image-size must be at least {MIN_INPUT_SIZE}, got {args.serve_image_size}")
    if args.images is not None and not os.path.isdir(args.images):
        raise UserError(f"--images {args.images}: no such folder")


def given_images(folder: str) -> list:
    """The bytes of up to MAX_IMAGES image files in `folder` (searched recursively, in name order)."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMG_EXTENSIONS))[:MAX_IMAGES]
    if not paths:
        raise UserError(f"--images {folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in it")
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def made_up_images(size: int, count: int = MADE_UP_IMAGES) -> list:
    """`count` JPEGs of `size` px: smooth colour fields with some noise, different for each image."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size),
                                                                                          Image.BICUBIC)
        pixels = np.asarray(coarse, np.float32) + rng.normal(0, 8, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class ServerProcess:
    """`xception serve WEIGHTS --port 0 FLAGS` in a subprocess; its output goes to a temporary file, where the
    start-up line gives the port. Used as a context manager: leaving it always stops the server."""

    def __init__(self, weights: str, flags: list):
        self.log = tempfile.TemporaryFile("w+")
        command = [sys.executable, "-m", "xception", "serve", weights, "--host", HOST, "--port", "0", *flags]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.port = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                last = (self.output().strip().splitlines() or ["(no output)"])[-1]
                raise UserError(f"--weights: xception serve exited {self.proc.returncode}: {last}")
            if self.port is None:
                found = re.search(r"http://[^ ]*:(\d+)/", self.output())
                self.port = int(found.group(1)) if found else None
            if self.port is not None and _get(self.port, "/readyz")[0] == 200:
                return self
            time.sleep(0.2)
        raise UserError(f"--weights: xception serve was not ready after {timeout:g} s")

    def metadata(self) -> dict:
        status, body = _get(self.port, "/metadata")
        return json.loads(body) if status == 200 else {}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def _get(port: int, path: str) -> tuple:
    """(status, body) of GET path, or (None, b"") where the server does not answer (yet)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return None, b""
    finally:
        connection.close()


def _client(port: int, images: list, offset: int, start: threading.Barrier, stop_at: list, out: list) -> None:
    """One client: POST the images in turn over one keep-alive connection until stop_at[0]; appends
    (latency s, status or None for a connection error, batch size or 0) per request to `out`."""
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    start.wait()
    i = offset
    while time.perf_counter() < stop_at[0]:
        body = images[i % len(images)]
        i += 1
        began = time.perf_counter()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            response.read()
            out.append((time.perf_counter() - began, response.status,
                        int(response.getheader("X-Batch-Size") or 0)))
        except (OSError, http.client.HTTPException):
            out.append((time.perf_counter() - began, None, 0))
            connection.close()  # http.client reconnects on the next request
    connection.close()


def summarize(records: list, seconds: float) -> dict:
    """A row's figures from its (latency s, status, batch size) records over `seconds` of load."""
    ok = [r for r in records if r[1] == 200]
    latencies = np.array([r[0] for r in ok]) * 1000
    return {"requests": len(ok), "seconds": seconds, "requests_per_s": len(ok) / seconds,
            "p50_ms": float(np.percentile(latencies, 50)) if ok else None,
            "p99_ms": float(np.percentile(latencies, 99)) if ok else None,
            "http_errors": sum(1 for r in records if r[1] not in (200, None)),
            "connection_errors": sum(1 for r in records if r[1] is None),
            "mean_batch": statistics.fmean(r[2] for r in ok) if ok else None}


def run_load(port: int, images: list, clients: int, duration: float) -> dict:
    """`clients` threads POSTing `images` for `duration` seconds, started together; the row's figures and
    this process's CPU time per answered request (the load generator's own cost)."""
    records = [[] for _ in range(clients)]
    start, stop_at = threading.Barrier(clients + 1), [0.0]
    threads = [threading.Thread(target=_client, args=(port, images, i, start, stop_at, records[i]), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    cpu = time.process_time()
    stop_at[0] = time.perf_counter() + duration
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    row = summarize([r for client in records for r in client], time.perf_counter() - began)
    row["client_cpu_ms_per_request"] = 1000 * (time.process_time() - cpu) / max(row["requests"], 1)
    return row


def _quiet(*_):
    pass


def run_baseline(weights: str, device, images: list, duration: float, image_size: int | None = None) -> dict:
    """The no-server row: the weights loaded once here as `xception predict` loads them, then one image per
    forward pass (predict's decode and eval transform, forward, predict's top-5 answer) for `duration` s."""
    predictor = load_predictor(weights, device, PredictOptions(image_size=image_size, device=str(device)), _quiet)
    transform = predictor.transform()
    k = min(5, len(predictor.class_names))
    records = []
    with torch.inference_mode():
        predictor.model(to_device(transform.load_bytes(images[0])[None], device, channels_last=False))  # warm-up
        cpu, began = time.process_time(), time.perf_counter()
        stop_at, i = began + duration, 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            batch = to_device(transform.load_bytes(images[i % len(images)])[None], device, channels_last=False)
            top_results(predictor, predictor.model(batch), k)
            records.append((time.perf_counter() - t0, 200, 1))
            i += 1
    row = summarize(records, time.perf_counter() - began)
    row["client_cpu_ms_per_request"] = None  # no client: this process is the model
    row["process_cpu_s"] = time.process_time() - cpu
    return row


def server_row(args, max_batch: int, images: list | None) -> tuple:
    """(row, images) of one server setting against a fresh server; images made up at the served size
    when none are given yet."""
    flags = ["--max-batch", str(max_batch), "--max-wait-ms", f"{args.max_wait_ms:g}", "--device", args.device]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.serve_image_size:
        flags += ["--image-size", str(args.serve_image_size)]
    with ServerProcess(args.weights, flags) as server:
        server.wait_ready()
        meta = server.metadata()
        images = images or made_up_images(int(meta.get("image_size") or 299))
        row = run_load(server.port, images, args.clients, args.duration)
        stats = server.metadata().get("stats", {})
        row["exit_code"] = server.stop()
    row.update(setting=f"server, max batch {max_batch}" + (f", wait {args.max_wait_ms:g} ms" if max_batch > 1
                                                             else ""),
               max_batch=max_batch, server_batches=stats.get("batches"), load_avg_1m=os.getloadavg()[0],
               image_size=meta.get("image_size"), precision=meta.get("precision"))
    return row, images


def print_serve_bench(result: dict) -> None:
    print(f"serve load test: {result['weights']} ({result['image_size']} px, {result['precision']}), "
          f"{result['clients']} clients, {result['duration']:g} s per row, {result['device']}, "
          f"{result['threads'] or 'default'} threads, {result['images']} images")
    print(f"  {'setting':34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'batch':>6} {'vs b1':>6}")
    for r in result["rows"]:
        def ms(v):
            return "-" if v is None else f"{v:.1f}"
        print(f"  {r['setting']:34} {r['requests_per_s']:8.2f} {ms(r['p50_ms']):>8} {ms(r['p99_ms']):>8} "
              f"{r['http_errors'] + r['connection_errors']:7d} {ms(r['mean_batch']):>6} "
              f"{r['ratio_to_batch1']:6.2f}")
    cpu = [f"{r['client_cpu_ms_per_request']:.2f}" for r in result["rows"] if r["client_cpu_ms_per_request"]]
    print(f"  client CPU per request (ms): {', '.join(cpu)}; load average (1 min) after each row: "
          + ", ".join(f"{r['load_avg_1m']:.2f}" for r in result["rows"]))


def run_serve_bench(args) -> dict:
    check_flags(args)
    images = given_images(args.images) if args.images else None
    batching, images = server_row(args, args.max_batch, images)
    single, _ = server_row(args, 1, images)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = run_baseline(args.weights, device, images, args.duration, args.serve_image_size)
    baseline.update(setting="in-process predict, batch 1", max_batch=1, load_avg_1m=os.getloadavg()[0])
    rows = [batching, single, baseline]
    for r in rows:
        r["ratio_to_batch1"] = r["requests_per_s"] / single["requests_per_s"] if single["requests_per_s"] else 0.0
    result = {"mode": "serve", "weights": args.weights, "image_size": batching["image_size"],
              "precision": batching["precision"], "clients": args.clients, "duration": args.duration,
              "device": str(device), "threads": args.threads, "images": len(images),
              "torch_version": torch.__version__, "rows": rows,
              "errors": sum(r["http_errors"] + r["connection_errors"] for r in rows)}
    return result
