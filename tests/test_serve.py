"""`xception serve`: a real uvicorn server in a subprocess on 127.0.0.1, answered like `xception predict`,
batching requests that arrive together, refusing bad input with a 4xx and carrying on, and stopping
gracefully on SIGTERM."""

import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error, run_cli
from xception import cli
from xception.checkpoint import Checkpoint
from xception.config import UserError
from xception.model import Xception
from xception.tools.predict import PredictOptions, predict

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CLASSES = ["tabby cat", "golden retriever", "red fox", "snowy owl", "sea turtle"]
SIZE = 71  # the model's minimum input: the fastest forward


def tiny_checkpoint(path):
    """Random weights of 5 named classes, made to answer like a trained network: the BatchNorm statistics
    measured on random probe images (random-init statistics let activations grow layer after layer, and the
    float32 rounding with them), and a head centred on the probes' features and scaled to logits of spread
    about 1.5, so that images get uneven, differing answers."""
    torch.manual_seed(0)
    model = Xception(num_classes=len(CLASSES))
    head, model.fc = model.fc, torch.nn.Identity()
    generator = torch.Generator().manual_seed(1)
    probe = torch.rand(16, 3, SIZE, SIZE, generator=generator) * 2 - 1
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the probe batch
    with torch.no_grad():
        model.train()(probe)
        features = model.eval()(probe)
        mean = features.mean(0)
        weight = torch.randn(len(CLASSES), features.shape[1], generator=generator)
        weight /= ((features - mean) @ weight.T).std() / 1.5
        head.weight.copy_(weight)
        head.bias.copy_(-weight @ mean)
    model.fc = head
    Checkpoint(model=model.state_dict(), class_names=CLASSES,
               args={"image_size": SIZE, "crop_pct": 0.875}).save(str(path))
    return str(path)


def noise_image(path, seed, size=(80, 72)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, 1, 3)) * 0.7
    pixels = np.clip(base + rng.integers(0, 80, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": 90} if str(path).endswith(".jpg") else {}))
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`xception serve WEIGHTS FLAGS` in a subprocess on a free port; its output goes to files in `folder`."""

    def __init__(self, weights, folder, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = open(folder / "serve.out", "w+"), open(folder / "serve.err", "w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread: the test machine's CPUs are shared
        self.proc = subprocess.Popen([sys.executable, "-m", "xception", "serve", weights, "--port", str(self.port),
                                      "--threads", "1", *map(str, flags)], stdout=self.out, stderr=self.err, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=120)  # one client: its set-up costs 0.1-0.4 s

    def logs(self):
        self.out.flush(), self.err.flush()
        return open(self.out.name).read() + open(self.err.name).read()

    def wait_ready(self, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.logs()}"
            try:
                if self.client.get("/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready after {timeout} s: {self.logs()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.client.close(), self.out.close(), self.err.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, 16 images alternately PNG and JPEG, predict --json's answer per path, the server). The
    reference answers come from the function behind `xception predict --json`, run here while the server
    starts (one torch import less than a CLI run)."""
    folder = tmp_path_factory.mktemp("serve")
    weights = tiny_checkpoint(folder / "tiny.pth.tar")
    images = [noise_image(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", i, (72 + i % 9, 80 - i % 7))
              for i in range(16)]
    server = Server(weights, folder, "--max-batch", 8, "--max-wait-ms", 300, "--max-body-mb", 1)
    try:
        out = json.loads(json.dumps(predict(images, weights, PredictOptions(), log=lambda *a: None)))
        expected = {p["path"]: p for p in out["predictions"]}
        assert sorted(expected) == sorted(images) and not out["errors"]
        yield weights, images, expected, server.wait_ready()
    finally:
        server.stop()


def post_image(server, path, multipart=False, **kw):
    data = open(path, "rb").read()
    kind = "image/png" if path.endswith(".png") else "image/jpeg"
    if multipart:
        return server.client.post("/predict", files={"file": (os.path.basename(path), data, kind)}, **kw)
    return server.client.post("/predict", content=data, headers={"Content-Type": kind}, **kw)


def same_answer(got, want):
    assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]], (got, want)
    assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]]
    for g, w in zip(got["top"], want["top"]):
        assert abs(g["probability"] - w["probability"]) <= 1e-5, (got, want)


def test_health_ready_and_metadata_describe_the_checkpoint(setup):
    weights, _, _, server = setup
    assert server.client.get("/healthz").json() == {"status": "ok"}
    assert server.client.get("/readyz").json() == {"status": "ready"}
    meta = server.client.get("/metadata").json()
    assert meta["classes"] == CLASSES and meta["num_classes"] == 5
    assert (meta["image_size"], meta["crop_pct"], meta["arch"]) == (SIZE, 0.875, "xception")
    assert (meta["precision"], meta["multi_label"], meta["threshold"]) == ("fp32", False, None)
    assert meta["temperature"] == 1.0
    assert meta["max_batch"] == 8
    lines = server.logs()
    assert f"http://127.0.0.1:{server.port}/" in lines and "max batch 8" in lines and "ready" in lines


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(setup):
    _, images, expected, server = setup
    answers, gate = [None] * len(images), threading.Barrier(len(images))

    def send(i):
        gate.wait()
        answers[i] = post_image(server, images[i], multipart=bool(i % 3 == 0))
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    [t.start() for t in threads]
    [t.join(timeout=180) for t in threads]
    sizes = []
    for path, r in zip(images, answers):
        assert r is not None and r.status_code == 200, r and r.text
        same_answer(r.json(), expected[path])
        assert set(r.json()) == {"top"}
        sizes.append(int(r.headers["X-Batch-Size"]))
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    stats = server.client.get("/metadata").json()["stats"]
    assert stats["largest_batch"] <= 8 and stats["batches"] < stats["requests"], stats
    top2 = post_image(server, images[3], params={"topk": 2}).json()
    same_answer(top2, {"top": expected[images[3]]["top"][:2]})
    assert len(top2["top"]) == 2


def png_claiming(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


def test_bad_input_is_a_4xx_json_error_and_the_server_carries_on(setup):
    _, images, expected, server = setup
    jpeg = open(images[0], "rb").read()
    over = b"\xff" * (1024 * 1024 + 1000)  # --max-body-mb 1

    def chunks():
        for i in range(0, len(over), 65536):
            yield over[i:i + 65536]
    cases = [
        ("not an image", {"content": b"hello, not pixels", "headers": {"Content-Type": "image/png"}}, {400, 415}),
        ("truncated JPEG", {"content": jpeg[:len(jpeg) // 2], "headers": {"Content-Type": "image/jpeg"}}, {400, 422}),
        ("bomb", {"content": png_claiming(30000, 30000), "headers": {"Content-Type": "image/png"}}, {413, 422}),
        ("over MAX_PIXELS", {"content": png_claiming(9000, 9000), "headers": {"Content-Type": "image/png"}}, {413}),
        ("empty body", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, {400}),
        ("over --max-body-mb", {"content": over, "headers": {"Content-Type": "image/jpeg"}}, {413}),
        ("over, no length", {"content": chunks(), "headers": {"Content-Type": "image/jpeg"}}, {413}),
        ("text/plain", {"content": jpeg, "headers": {"Content-Type": "text/plain"}}, {415}),
        ("application/json", {"json": {"image": "x"}}, {415}),
        ("multipart without a file", {"data": {"name": "x"}, "files": {"other": ("a.jpg", jpeg, "image/jpeg")}},
         {400}),
        ("topk 0", {"content": jpeg, "headers": {"Content-Type": "image/jpeg"}, "params": {"topk": 0}}, {422}),
        ("topk not an int", {"content": jpeg, "headers": {"Content-Type": "image/jpeg"}, "params": {"topk": "x"}},
         {422}),
    ]
    for name, request, statuses in cases:
        r = server.client.post("/predict", timeout=60, **request)
        assert r.status_code in statuses, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error, (name, r.text)
        good = post_image(server, images[5])
        assert good.status_code == 200, (name, good.text)
        same_answer(good.json(), expected[images[5]])
    assert "Traceback" not in server.logs()


def slow_post(port, path, release, answers, i):
    """POST `path`'s bytes sending the first half of the body, then, once `release` is set, the rest."""
    data = open(path, "rb").read()

    def body():
        yield data[:len(data) // 2]
        release.wait(120)
        yield data[len(data) // 2:]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/predict", body=body(), headers={"Content-Type": "application/octet-stream",
                                                          "Content-Length": str(len(data))})
    response = conn.getresponse()
    answers[i] = (response.status, json.loads(response.read()))
    conn.close()


def listening(url):
    try:
        httpx.get(url + "/healthz", timeout=2)
        return True
    except httpx.TransportError:
        return False


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(setup):
    """Runs last of the tests using the module's server: it stops it. Three requests are in flight for sure
    (their bodies half sent) when SIGTERM comes; their rest is sent after it, and they are answered."""
    _, images, expected, server = setup
    release, answers = threading.Event(), [None] * 3
    threads = [threading.Thread(target=slow_post, args=(server.port, images[i], release, answers, i))
               for i in range(3)]
    [t.start() for t in threads]
    deadline = time.monotonic() + 60
    while server.client.get("/metadata").json()["stats"]["in_flight"] < 3:
        assert time.monotonic() < deadline, "the 3 requests never were in flight together"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while listening(server.url):  # uvicorn stops accepting; the requests in flight are still being served
        assert time.monotonic() < deadline, "still accepting connections 30 s after SIGTERM"
        time.sleep(0.1)
    release.set()
    [t.join(timeout=120) for t in threads]
    for path, answer in zip(images, answers):
        assert answer is not None and answer[0] == 200, answer
        same_answer(answer[1], expected[path])
    assert server.proc.wait(timeout=60) == 0, server.logs()
    assert "stopped" in server.logs() and "Traceback" not in server.logs()


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    line = one_line_error(run_cli("serve", tmp_path / "missing.pth"))
    assert "missing.pth" in line and "no such file" in line
    assert cli.main(["serve", str(tmp_path / "missing.pth"), "--max-batch", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-batch must be at least 1" in err


def test_a_missing_serve_extra_names_the_install_line(monkeypatch):
    from xception.tools import serve
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name))
    with pytest.raises(UserError, match=r"pip install 'xception\[serve\]'"):
        serve.need_serve_extra()


def test_decode_refuses_a_bomb_before_decoding_it():
    from xception.data.transforms import pil_eval
    from xception.tools.batching import Refused, decode
    with pytest.raises(Refused) as e:
        decode(pil_eval(SIZE, 1.0), png_claiming(20000, 20000))
    assert e.value.status == 413
    buf = io.BytesIO()
    Image.new("RGB", (80, 72), "red").save(buf, format="PNG")
    assert tuple(decode(pil_eval(SIZE, 1.0), buf.getvalue()).shape) == (3, SIZE, SIZE)


def test_readyz_is_503_until_the_model_is_loaded_and_warmed_up():
    """In process, with a stand-in model whose loading waits for the test: /healthz answers at once, /readyz
    and /predict are 503 until the load and the warm-up batch are done."""
    from fastapi.testclient import TestClient
    from xception.tools.batching import Batcher
    from xception.tools.predict import Predictor
    from xception.tools.serve import build_app
    release, warmed = threading.Event(), []

    def model(x):
        warmed.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2)

    def load():
        release.wait(30)
        return Predictor(model, ["a", "b"], SIZE, 1.0)
    batcher = Batcher(load, torch.device("cpu"), 4, 0)
    with TestClient(build_app(batcher, "stand-in", "cpu", 1 << 20, 5)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503 and client.get("/metadata").status_code == 503
        assert client.post("/predict", content=b"x", headers={"Content-Type": "image/png"}).status_code == 503
        release.set()
        assert batcher.ready.wait(30)
        assert client.get("/readyz").json() == {"status": "ready"} and warmed == [(1, 3, SIZE, SIZE)]
        assert client.get("/metadata").json()["classes"] == ["a", "b"]
