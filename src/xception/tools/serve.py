"""`xception serve WEIGHTS`: an HTTP server (FastAPI + uvicorn, the `serve` extra) that classifies images.

Endpoints: POST /predict (the image as the raw body, or multipart field `file`/`image`; ?topk=K) answers one
entry of `predict --json`'s predictions, computed by the same decode and eval transform (`pil_eval(...)
.load_bytes`) and the same reading of the logits (predict.top_results). GET /healthz (the process is up),
/readyz (200 once the model is loaded and has run one warm-up batch, 503 before), /metadata, and / (a page to
try images on, tools/serve_page.html).

Dynamic batching: each request decodes its image in the server's thread pool, then hands the uint8 tensor to
ONE model thread (`Batcher`) and waits for its own result. The model thread takes the first waiting image,
then whatever else arrives within --max-wait-ms, up to --max-batch, runs them as one forward pass and answers
each caller; the response header X-Batch-Size says how many images shared the pass.

Bad input is a 4xx JSON {"error": "..."}: 415 for a content type other than image/*, application/octet-stream
or multipart/form-data; 400 for an empty body or bytes Pillow cannot decode (not an image, truncated); 413 for a
body over --max-body-mb (by its Content-Length, and counted while reading, for a client that sends more than it
said or no length at all) or an image over MAX_PIXELS (read from its header, before any decoding); 422 for a bad
?topk. SIGTERM (or Ctrl-C): uvicorn stops accepting, the requests in flight are answered, the model thread
drains and stops, and the process exits 0.
"""

import asyncio
import importlib.util
import os
import signal
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch

from ..config import UserError
from ..model.weights import weights_choice
from ..runtime import resolve_device
from .batching import Batcher, Refused, decode, first_line
from .predict import PredictOptions, load_predictor, weights_file

RAW_TYPES = ("application/octet-stream",)  # besides image/*
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_page.html")


@dataclass
class ServeOptions:
    """The server's settings; their defaults are the flags' (toolflags.add_serve_flags)."""
    host: str
    port: int
    max_batch: int
    max_wait_ms: float
    max_body_mb: float
    threads: int | None  # intra-op threads (torch's, onnxruntime's); None: torch's default

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise UserError(f"--max-wait-ms must be in 0..10000, got {self.max_wait_ms:g}")
        if not self.max_body_mb > 0:
            raise UserError(f"--max-body-mb must be positive, got {self.max_body_mb:g}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes: from its
    Content-Length before reading, else while reading (a client sending more than it said, or chunks)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Refused(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise Refused(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes (--max-body-mb)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Refused(413, f"body over the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request, limit: int) -> bytes:
    """The uploaded image's bytes: the raw body (image/*, application/octet-stream, or no Content-Type), or
    the `file` (else `image`) field of a multipart/form-data body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = kind == "multipart/form-data"
    if kind and not (multipart or kind.startswith("image/") or kind in RAW_TYPES):
        raise Refused(415, f"Content-Type {kind} is not accepted: send the image as image/*, "
                           f"application/octet-stream or multipart/form-data (field 'file')")
    data = await read_body(request, limit)
    if not multipart:
        return data
    from starlette.requests import Request

    async def replay():
        return {"type": "http.request", "body": data, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as e:  # starlette's MultiPartException and python-multipart's errors
        raise Refused(400, f"cannot read the multipart body ({first_line(e)})")
    part = form.get("file") or form.get("image")
    if part is None or isinstance(part, str):
        raise Refused(400, "the multipart body holds no file in a field named 'file' or 'image'")
    return await part.read()


def metadata(batcher: Batcher, weights: str, device) -> dict:
    p = batcher.predictor
    graph_meta = getattr(p.model, "meta", None) or {}
    return {"weights": weights, "arch": graph_meta.get("arch") or getattr(p.model, "arch", "xception"),
            "classes": p.class_names, "num_classes": len(p.class_names), "image_size": p.image_size,
            "crop_pct": p.crop_pct, "precision": graph_meta.get("precision", "fp32"),
            "multi_label": p.multi_label, "threshold": p.threshold, "temperature": p.temperature,
            "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000, "device": str(device),
            "stats": dict(batcher.stats)}


def need_serve_extra() -> None:
    """Refuse, in one line, to serve without the optional packages of the `serve` extra."""
    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"xception serve needs {package}: pip install 'xception[serve]'")
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        raise UserError("xception serve needs python-multipart: pip install 'xception[serve]'")


def _error_handlers(app) -> None:
    """Every refusal as {"error": "..."} with its status, FastAPI's own (404, 405, 422) included."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        said = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return JSONResponse({"error": said or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request, e: Exception):
        return JSONResponse({"error": f"internal error: {first_line(e)}"}, status_code=500)


def build_app(batcher: Batcher, weights: str, device, body_limit: int, default_topk: int):
    """The FastAPI app: its lifespan starts the model thread and, at shutdown (after the requests in flight
    are answered), lets it drain and stop."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="xception serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _error_handlers(app)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if batcher.ready.is_set():
            return {"status": "ready"}
        return JSONResponse({"status": "failed" if batcher.failed else "loading"}, status_code=503)

    @app.get("/metadata")
    async def meta():
        if not batcher.ready.is_set():
            raise Refused(503, "the model is not loaded yet: wait for /readyz")
        return metadata(batcher, weights, device)

    @app.post("/predict")
    async def predict(request: Request, topk: int | None = Query(None, ge=1)):
        if not batcher.ready.is_set():
            raise Refused(503, "the model is not loaded yet: wait for /readyz")
        batcher.stats["in_flight"] += 1
        try:
            data = await image_bytes(request, body_limit)
            image = await run_in_threadpool(decode, batcher.transform, data)
            answer, size = await asyncio.wrap_future(batcher.submit(image, topk or default_topk))
        finally:
            batcher.stats["in_flight"] -= 1
        return JSONResponse(answer, headers={"X-Batch-Size": str(size)})

    return app


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn, so that a busy or bad address is a one-line error here."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                        f"--port (or --host)")
    return sock


def serve(weights: str, popts: PredictOptions, sopts: ServeOptions, log=None) -> int:
    """Serve `weights` until SIGTERM or Ctrl-C; 0 after a graceful stop, 1 if the weights failed to load."""
    log = log or (lambda *a: print(*a, flush=True))
    need_serve_extra()
    import uvicorn
    popts.check()
    sopts.check()
    local = weights_file(weights, "WEIGHTS", log)
    if not os.path.isfile(local):
        raise UserError(f"WEIGHTS {weights}: no such file; give a checkpoint, a weights file, an .onnx from "
                        f"xception export, or a published name (imagenet, keras, hf-hub:ORG/REPO)")
    device = resolve_device(popts.device)
    if sopts.threads:
        torch.set_num_threads(sopts.threads)
    sock = _listen(sopts.host, sopts.port)
    server, failed = None, []

    def on_failure(e):
        print(f"xception: error: {e if isinstance(e, UserError) else first_line(e)}", file=sys.stderr, flush=True)
        failed.append(e)
        if server is not None:
            server.should_exit = True
    batcher = Batcher(lambda: load_predictor(local, device, popts, log), device, sopts.max_batch,
                      sopts.max_wait_ms, log, on_failure)
    app = build_app(batcher, weights, device, int(sopts.max_body_mb * 1024 * 1024), popts.topk)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    port = sock.getsockname()[1]
    shown = f"[{sopts.host}]" if ":" in sopts.host else sopts.host
    log(f"xception serve: http://{shown}:{port}/ weights {weights} on {device}, max batch {sopts.max_batch} "
        f"(wait {sopts.max_wait_ms:g} ms), body limit {sopts.max_body_mb:g} MB")
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # uvicorn re-raises the signal that stopped it once done; a no-op handler makes that exit 0
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        sock.close()
    log("xception serve: stopped")
    return 1 if failed else 0


def run(args) -> int:
    popts = PredictOptions(topk=args.topk, image_size=args.image_size, crop_pct=args.crop_pct, device=args.device,
                           weights_choice=weights_choice(args.raw_weights, args.ema_weights),
                           threshold=args.threshold)
    sopts = ServeOptions(args.host, args.port, args.max_batch, args.max_wait_ms, args.max_body_mb, args.threads)
    return serve(args.weights, popts, sopts)
