"""Published weights by name (model/hub.py: `--pretrained imagenet | keras | hf-hub:ORG/REPO[@REV]`), with the real
download code (huggingface_hub's hf_hub_download, torch.hub's download_url_to_file) against a server on 127.0.0.1
that each test starts: it answers the Hub's /ORG/REPO/resolve/REV/FILE requests (HEAD and GET, with the headers
huggingface_hub needs: X-Repo-Commit, ETag, Content-Length; X-Error-Code on errors) and serves a Keras-style file
under /keras/. Served files are small fakes, except the end-to-end predict test's real Xception weights.

No test reaches another host: HF_ENDPOINT and the Keras base URL are the loopback server's, and
`socket.create_connection` refuses any other address while a test runs.
"""

import base64
import hashlib
import http.server
import json
import os
import re
import socket
import threading
import time
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from xception.config import UserError
from xception.model import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LFS = (".safetensors", ".bin", ".h5")  # stored in git LFS on the Hub: ETag is the sha256 of the content


class FakeHub:
    """A Hugging Face Hub endpoint (resolve requests only) and a Keras download folder on 127.0.0.1.

    repos: {repo id: {file name: bytes}}; revisions: names besides "main" and COMMIT that resolve;
    keras: {file name: bytes} under /keras/. `requests` lists (method, path) of every request received."""

    def __init__(self):
        self.repos, self.keras, self.revisions, self.requests = {}, {}, set(), []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                fake.answer(self, body=False)

            def do_GET(self):
                fake.answer(self, body=True)

            def do_POST(self):
                fake.receive(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def gets(self, suffix):
        return sum(1 for m, p in self.requests if m == "GET" and p.endswith(suffix))

    @staticmethod
    def _send(handler, status, headers, data, body):
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def answer(self, handler, body):
        path = handler.path
        self.requests.append((handler.command, path))
        if path.startswith("/keras/"):
            data = self.keras.get(path[len("/keras/"):])
            if data is None:
                return self._send(handler, 404, {}, b"not found", body)
            return self._send(handler, 200, {"Content-Type": "application/octet-stream"}, data, body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None:
            return self._send(handler, 404, {}, b"not found", body)
        repo, revision, filename = m.group(1), unquote(m.group(2)), unquote(m.group(3))
        error = {"Content-Type": "application/json"}
        if repo not in self.repos:  # the Hub answers 401 for a missing (or private) repo without a token
            return self._send(handler, 401, {**error, "X-Error-Code": "RepoNotFound"},
                              b'{"error":"Repository not found"}', body)
        if revision not in {"main", COMMIT} | self.revisions:
            return self._send(handler, 404, {**error, "X-Error-Code": "RevisionNotFound"},
                              b'{"error":"Invalid rev id"}', body)
        data = self.repos[repo].get(filename)
        if data is None:
            return self._send(handler, 404, {**error, "X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT},
                              b'{"error":"Entry not found"}', body)
        if filename.endswith(LFS):
            etag = hashlib.sha256(data).hexdigest()
        else:  # a file in git: its git blob sha1
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        self._send(handler, 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"',
                                  "Content-Type": "application/octet-stream"}, data, body)


    def receive(self, handler):
        """The Hub's upload API as huggingface_hub's create_repo and upload_folder use it: create a repository,
        validate the model card's YAML, ask each file's upload mode ("regular": its bytes travel inside the
        commit, base64, so no LFS transfer is needed), then the commit (NDJSON), stored into `repos`."""
        size = int(handler.headers.get("Content-Length") or 0)
        data, path = handler.rfile.read(size), handler.path
        self.requests.append(("POST", path))
        reply = {"error": "not found"}
        if path == "/api/repos/create":
            request = json.loads(data)
            repo = f"{request['organization']}/{request['name']}"
            self.repos.setdefault(repo, {})
            reply = {"url": f"{self.url}/{repo}"}
        elif path == "/api/validate-yaml":
            reply = {"errors": [], "warnings": []}
        elif (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)) is not None:
            repo, step = m.group(1), m.group(2)
            if step == "preupload":
                reply = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in json.loads(data)["files"]]}
            else:
                for line in data.decode().splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "file":
                        self.repos[repo][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                reply = {"commitUrl": f"{self.url}/{repo}/commit/{COMMIT}", "commitOid": COMMIT,
                         "commitMessage": "upload"}
        status = 404 if "error" in reply else 200
        self._send(handler, status, {"Content-Type": "application/json"}, json.dumps(reply).encode(), True)


def timm_config(architecture, num_classes=1000):
    """A timm config.json, as push_to_hf_hub writes it."""
    return json.dumps({"architecture": architecture, "num_classes": num_classes, "num_features": 2048,
                       "pretrained_cfg": {"tag": "tf_in1k", "input_size": [3, 299, 299], "crop_pct": 0.8975,
                                          "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": num_classes,
                                          "first_conv": "conv1", "classifier": "fc"}}).encode()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """(FakeHub, its environment): HF_ENDPOINT, HF_HOME/HF_HUB_CACHE, TORCH_HOME and XCEPTION_KERAS_BASE_URL point at
    the server and at empty folders of this test. huggingface_hub reads its environment once, at import, so its
    constants are set too (the subprocess of the end-to-end test reads the environment itself)."""
    from huggingface_hub import constants

    fake = FakeHub()
    env = {"HF_ENDPOINT": fake.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "TORCH_HOME": str(tmp_path / "torch"), hub.KERAS_BASE_ENV: fake.url + "/keras/",
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    assert constants.ENDPOINT.startswith("http://127.0.0.1:")
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith("http://127.0.0.1:")
    assert os.environ["HF_ENDPOINT"].startswith("http://127.0.0.1:")
    assert hub.keras_url().startswith("http://127.0.0.1:")

    real_connect = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        assert address[0] in LOOPBACK, f"a test tried to reach {address[0]}"
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    yield fake, env
    fake.stop()


def user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def fast_hub_retries(monkeypatch):
    """huggingface_hub retries a failed connection 5 times with 1-8 s waits; the waits are skipped here."""
    from huggingface_hub.utils import _http

    class NoSleep:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            pass

    monkeypatch.setattr(_http, "time", NoSleep())


# --- the Hugging Face Hub: --pretrained imagenet and hf-hub:ORG/REPO[@REV] ---


def test_imagenet_downloads_the_timm_repo_once_then_reads_the_cache(fake_hub, tmp_path):
    fake, env = fake_hub
    weights = os.urandom(4096)
    fake.repos["timm/legacy_xception.tf_in1k"] = {"config.json": timm_config("legacy_xception"),
                                                  "model.safetensors": weights}
    path, arch = hub.resolve_pretrained("imagenet")
    assert arch == "xception"
    assert os.path.basename(path) == "model.safetensors" and path.startswith(env["HF_HUB_CACHE"])
    assert open(path, "rb").read() == weights
    assert fake.gets("/timm/legacy_xception.tf_in1k/resolve/main/model.safetensors") == 1
    assert hub.resolve_pretrained("imagenet") == (path, "xception")  # the cache: no second download
    assert fake.gets("model.safetensors") == 1
    assert not any(p.endswith("pytorch_model.bin") for _, p in fake.requests)
    assert not os.path.exists(tmp_path / "torch")  # the Hub's cache only


def test_imagenet_of_another_arch_and_the_pytorch_model_bin_fallback(fake_hub):
    fake, _ = fake_hub
    fake.repos["timm/xception65.ra3_in1k"] = {"config.json": timm_config("xception65"),
                                              "pytorch_model.bin": b"bin weights"}
    path, arch = hub.resolve_pretrained("imagenet", arch="xception65")
    assert arch == "xception65" and os.path.basename(path) == "pytorch_model.bin"
    assert open(path, "rb").read() == b"bin weights"
    assert fake.gets("model.safetensors") == 0  # its HEAD said 404 EntryNotFound: no GET
    assert ("HEAD", "/timm/xception65.ra3_in1k/resolve/main/model.safetensors") in fake.requests


def test_a_repo_without_weights_and_a_missing_repo_are_one_line(fake_hub):
    fake, _ = fake_hub
    fake.repos["timm/legacy_xception.tf_in1k"] = {"config.json": timm_config("legacy_xception")}
    msg = user_error(hub.resolve_pretrained, "imagenet")
    assert msg.startswith("--pretrained imagenet: cannot get model.safetensors or pytorch_model.bin of "
                          "timm/legacy_xception.tf_in1k"), msg
    assert "holds neither file" in msg and msg.endswith("yourself and pass --pretrained PATH"), msg
    msg = user_error(hub.resolve_pretrained, "hf-hub:nobody/nothing", flag="--weights")
    assert "nobody/nothing" in msg and "no such repository, or a private one (HTTP 401)" in msg, msg
    assert f"download {fake.url}/nobody/nothing/resolve/main/model.safetensors yourself and pass --weights PATH" in msg


def test_offline_with_an_empty_cache_is_one_line_without_a_request(fake_hub, monkeypatch):
    fake, env = fake_hub
    from huggingface_hub import constants

    fake.repos["timm/legacy_xception.tf_in1k"] = {"model.safetensors": b"w"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    msg = user_error(hub.resolve_pretrained, "imagenet")
    assert "timm/legacy_xception.tf_in1k" in msg and "HF_HUB_OFFLINE is set" in msg, msg
    assert f"neither file is in the cache ({env['HF_HUB_CACHE']})" in msg, msg
    assert "/timm/legacy_xception.tf_in1k/resolve/main/model.safetensors yourself and pass --pretrained PATH" in msg
    assert fake.requests == []


def test_offline_reads_what_an_earlier_download_cached(fake_hub, monkeypatch):
    fake, _ = fake_hub
    from huggingface_hub import constants

    fake.repos["timm/legacy_xception.tf_in1k"] = {"model.safetensors": b"cached weights"}
    online = hub.resolve_pretrained("imagenet")
    seen = len(fake.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve_pretrained("imagenet") == online
    assert len(fake.requests) == seen


def test_hf_hub_repo_at_a_revision_says_its_architecture(fake_hub):
    fake, _ = fake_hub
    fake.revisions.add("v1.0")
    fake.repos["someone/my-xception"] = {"config.json": timm_config("legacy_xception", num_classes=10),
                                         "model.safetensors": b"fine-tuned"}
    path, arch = hub.resolve_pretrained("hf-hub:someone/my-xception@v1.0", arch="xception41")
    assert arch == "xception" and open(path, "rb").read() == b"fine-tuned"
    assert fake.gets("/someone/my-xception/resolve/v1.0/config.json") == 1
    assert fake.gets("/someone/my-xception/resolve/v1.0/model.safetensors") == 1
    msg = user_error(hub.resolve_pretrained, "hf-hub:someone/my-xception@v2")
    assert "someone/my-xception@v2" in msg and "no such revision" in msg, msg


def test_hf_hub_repo_of_another_architecture_or_a_bad_name_is_refused(fake_hub):
    fake, _ = fake_hub
    fake.repos["someone/resnet"] = {"config.json": timm_config("resnet50"), "model.safetensors": b"w"}
    fake.repos["someone/not-timm"] = {"config.json": b'{"model_type": "vit"}', "model.safetensors": b"w"}
    msg = user_error(hub.resolve_pretrained, "hf-hub:someone/resnet")
    assert "holds a resnet50 model" in msg and "legacy_xception" in msg and "xception65p" in msg, msg
    assert 'names no "architecture"' in user_error(hub.resolve_pretrained, "hf-hub:someone/not-timm")
    assert fake.gets("model.safetensors") == 0  # refused before downloading weights
    for bad in ("hf-hub:no-slash", "hf-hub:a/b/c", "hf-hub:org/repo@", "hf-hub:"):
        assert "expected hf-hub:ORG/REPO" in user_error(hub.resolve_pretrained, bad)


def test_connection_refused_is_one_line(fake_hub, monkeypatch):
    fake, _ = fake_hub
    fake.stop()  # nothing listens on the port any more
    fast_hub_retries(monkeypatch)
    msg = user_error(hub.resolve_pretrained, "imagenet")
    assert f"from the Hugging Face Hub ({fake.url})" in msg and "network error" in msg, msg
    assert "refused" in msg.lower(), msg
    msg = user_error(hub.resolve_pretrained, "keras")
    assert f"cannot download {fake.url}/keras/{hub.KERAS_FILE}: network error" in msg, msg
    assert "refused" in msg.lower() and msg.endswith("yourself and pass --pretrained PATH"), msg


# --- the Keras applications file: --pretrained keras ---


def test_keras_download_is_checked_and_cached(fake_hub, monkeypatch):
    fake, env = fake_hub
    data = os.urandom(3000)
    fake.keras[hub.KERAS_FILE] = data
    monkeypatch.setattr(hub, "KERAS_MD5", hashlib.md5(data).hexdigest())  # the fake's published checksum
    path, arch = hub.resolve_pretrained("keras")
    assert arch == "xception"
    assert path == os.path.join(env["TORCH_HOME"], "hub", "checkpoints", hub.KERAS_FILE)
    assert open(path, "rb").read() == data
    assert hub.resolve_pretrained("keras") == (path, "xception")
    assert fake.gets(hub.KERAS_FILE) == 1  # the second call used the cache
    with open(path, "r+b") as f:  # a damaged cached copy is fetched again
        f.write(b"x")
    assert hub.resolve_pretrained("keras") == (path, "xception")
    assert fake.gets(hub.KERAS_FILE) == 2 and open(path, "rb").read() == data
    assert os.listdir(os.path.dirname(path)) == [hub.KERAS_FILE]


def test_keras_wrong_checksum_is_one_line_and_caches_nothing(fake_hub):
    fake, env = fake_hub
    fake.keras[hub.KERAS_FILE] = b"not the published file"
    msg = user_error(hub.resolve_pretrained, "keras")
    assert msg.startswith(f"--pretrained keras: {fake.url}/keras/{hub.KERAS_FILE} gave a file whose md5 is "
                          f"{hashlib.md5(b'not the published file').hexdigest()}, not the published {hub.KERAS_MD5}")
    assert msg.endswith(f"download {fake.url}/keras/{hub.KERAS_FILE} yourself and pass --pretrained PATH"), msg
    assert os.listdir(os.path.join(env["TORCH_HOME"], "hub", "checkpoints")) == []
    fake.keras.clear()
    assert "HTTP 404" in user_error(hub.resolve_pretrained, "keras")


def test_keras_published_checksum_is_keras_own():
    """The URL and md5 are keras.applications' (read from its source, not imported: keras needs a backend)."""
    import importlib.util

    spec = importlib.util.find_spec("keras")
    if spec is None:
        pytest.skip("keras is not installed")
    source = os.path.join(os.path.dirname(spec.origin), "src", "applications", "xception.py")
    if not os.path.exists(source):
        pytest.skip("this keras keeps its applications elsewhere")
    text = open(source).read()
    assert hub.KERAS_BASE_URL + hub.KERAS_FILE == "".join(re.findall(r'"([^"]*)"', text.split("WEIGHTS_PATH = (")[1]
                                                                     .split(")")[0]))
    assert f'file_hash="{hub.KERAS_MD5}"' in text


# --- names and class names ---


def test_names_and_paths():
    assert hub.resolve_pretrained("weights/model.pth") is None  # a path: the caller reads the file
    assert hub.resolve_pretrained("./imagenet") is None
    assert "known: xception, xception41" in user_error(hub.resolve_pretrained, "imagenet", arch="resnet")
    assert "original Xception's, not xception65's" in user_error(hub.resolve_pretrained, "keras", arch="xception65")
    assert set(hub.HUB_REPOS) <= set(hub.TIMM_ARCHS.values())
    assert hub.TIMM_ARCHS["legacy_xception"] == "xception"


def test_tables_match_the_family():
    """hub.py may not import family.py (it sits below it), so its tables are checked against the registry here."""
    from xception.model import family

    assert tuple(hub.HUB_REPOS) == family.ARCH_NAMES
    for arch, info in family.ARCHS.items():
        assert hub.TIMM_ARCHS[info.timm_name] == arch
        assert hub.HUB_REPOS[arch].startswith(f"timm/{info.timm_name}.")


def test_imagenet_class_names_are_shipped():
    names = hub.imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"


# --- xception predict --pretrained ---


def cli_error(capsys, *argv) -> str:
    """Run the CLI in this process; its one line on stderr (a user error)."""
    from xception.cli import main

    assert main([str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_predict_takes_weights_once(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(img)
    assert "--weights PATH or --pretrained NAME|PATH" in cli_error(capsys, "predict", img)
    assert "not both" in cli_error(capsys, "predict", img, "--weights", "x.pth", "--pretrained", "imagenet")
    assert "x.pth: no such file" in cli_error(capsys, "predict", img, "--pretrained", "x.pth")  # a path, as --weights


@pytest.mark.slow
def test_predict_pretrained_imagenet_names_the_reference_top5_then_works_offline(fake_hub, tmp_path, monkeypatch,
                                                                                 capsys):
    """End to end: `xception predict IMG --pretrained imagenet`, as a user runs it (a new process that reads
    HF_ENDPOINT and HF_HUB_CACHE from its environment), downloads timm's legacy_xception safetensors from the
    loopback Hub and gives the reference model's top 5 with ImageNet names; then, in this process with
    HF_HUB_OFFLINE, the same command reads the cache without a request."""
    timm = pytest.importorskip("timm")
    save_file = pytest.importorskip("safetensors.torch").save_file
    from huggingface_hub import constants

    from xception.cli import main
    from xception.data.transforms import load_rgb, pil_eval

    fake, env = fake_hub
    torch.manual_seed(2)
    ref = timm.create_model("legacy_xception", pretrained=False).eval()
    with torch.no_grad():
        ref.fc.weight.mul_(50)
    save_file(ref.state_dict(), str(tmp_path / "served.safetensors"))
    fake.repos["timm/legacy_xception.tf_in1k"] = {"config.json": timm_config("legacy_xception"),
                                                  "model.safetensors": (tmp_path / "served.safetensors").read_bytes()}
    img = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(img)
    x = pil_eval(71, 0.8975)(load_rgb(str(img))).float()[None] / 127.5 - 1
    with torch.no_grad():
        top5 = ref(x).softmax(1)[0].topk(5)
    names = hub.imagenet_class_names()
    argv = ["predict", str(img), "--pretrained", "imagenet", "--image-size", "71", "--json"]

    def check(out, stderr):
        assert out["weights"] == "imagenet" and out["weights_file"].startswith(env["HF_HUB_CACHE"])
        assert f"--pretrained imagenet: {out['weights_file']}" in stderr
        top = out["predictions"][0]["top"]
        assert [t["index"] for t in top] == top5.indices.tolist()
        assert np.allclose([t["probability"] for t in top], top5.values.tolist(), atol=1e-5)
        assert [t["class"] for t in top] == [names[i] for i in top5.indices.tolist()]

    proc = run_cli(*argv, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    check(json.loads(proc.stdout), proc.stderr)
    assert fake.gets("/timm/legacy_xception.tf_in1k/resolve/main/model.safetensors") == 1

    seen = len(fake.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    check(json.loads(captured.out), captured.err)
    assert len(fake.requests) == seen


# --- every command that takes weights takes the names: train --pretrained, eval, export (not average) ---
# (a timm legacy_xception of random weights, served as a repo of the loopback Hub; tiny images, 71 px)

_SERVED = {}  # num_classes -> the bytes of a timm legacy_xception model.safetensors (made once per test run)


def timm_weights(num_classes: int) -> bytes:
    """What timm's push_to_hf_hub uploads for a legacy_xception of `num_classes`: timm's names, safetensors."""
    if num_classes not in _SERVED:
        timm = pytest.importorskip("timm")
        save_file = pytest.importorskip("safetensors.torch").save_file
        import tempfile

        torch.manual_seed(num_classes)
        model = timm.create_model("legacy_xception", pretrained=False, num_classes=num_classes)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.safetensors")
            save_file(model.state_dict(), path)
            with open(path, "rb") as f:
                _SERVED[num_classes] = f.read()
    return _SERVED[num_classes]


def repo_config(num_classes: int, **pretrained_cfg) -> bytes:
    """timm_config's config.json with some of its pretrained_cfg replaced."""
    config = json.loads(timm_config("legacy_xception", num_classes))
    config["pretrained_cfg"].update(interpolation="bicubic", crop_mode="center")
    config["pretrained_cfg"].update(pretrained_cfg)
    return json.dumps(config).encode()


@pytest.mark.slow
def test_train_pretrained_hf_hub_fine_tunes_a_new_head(fake_hub, tmp_path):
    from conftest import TINY, make_image_folder

    fake, env = fake_hub
    fake.repos["someone/xception-5"] = {"config.json": repo_config(5), "model.safetensors": timm_weights(5)}
    data = make_image_folder(tmp_path / "data")  # 3 classes: the repo's 5-class head is replaced
    out = tmp_path / "run"
    proc = run_cli("train", "--data_path", data, "--pretrained", "hf-hub:someone/xception-5", "--epochs", 1,
                   "--output-dir", out, *TINY, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "the file's classifier has 5 classes, the model 3); a new 3-class classifier starts from scratch" \
        in proc.stdout, proc.stdout
    assert "timm weights imported" in proc.stdout, proc.stdout
    assert os.path.isfile(out / "checkpoint.pth.tar")
    assert fake.gets("/someone/xception-5/resolve/main/model.safetensors") == 1


@pytest.mark.slow
def test_eval_and_predict_by_name_use_the_repos_input_size_and_crop(fake_hub, tmp_path, capsys):
    from conftest import eval_figures, make_image_folder

    from xception.cli import main

    fake, env = fake_hub
    fake.repos["someone/xception-3"] = {"config.json": repo_config(3, input_size=[3, 80, 80], crop_pct=0.95),
                                        "model.safetensors": timm_weights(3)}
    data = make_image_folder(tmp_path / "data")  # 3 classes, as the repo's head
    proc = run_cli("eval", "--data_path", data, "--weights", "hf-hub:someone/xception-3", "--batch-size", 4,
                   "--workers", 0, "--seed", 3, "--output-dir", tmp_path / "eval", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "hf-hub:someone/xception-3: input image size 80 (the weights' own), crop pct 0.95 (the weights' own)" \
        in proc.stdout, proc.stdout
    assert eval_figures(proc)[0] == "9"

    img = tmp_path / "a.png"  # predict, in this process, reads the cache the eval filled
    Image.fromarray(np.full((90, 100, 3), 120, np.uint8)).save(img)
    capsys.readouterr()
    assert main(["predict", str(img), "--weights", "hf-hub:someone/xception-3", "--json", "--topk", "2"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert (out["image_size"], out["crop_pct"]) == (80, 0.95), captured.err
    assert "input image size 80 (the weights' own), crop pct 0.95 (the weights' own)" in captured.err
    assert fake.gets("model.safetensors") == 1


@pytest.mark.slow
def test_export_by_name_writes_the_repos_input_size(fake_hub, tmp_path, capsys):
    from xception.cli import main
    from xception.model.deploy import load_torchscript

    fake, _ = fake_hub
    fake.repos["someone/xception-3"] = {"config.json": repo_config(3, input_size=[3, 80, 80], crop_pct=0.95),
                                        "model.safetensors": timm_weights(3)}
    out = tmp_path / "model.pt"
    capsys.readouterr()
    assert main(["export", "--weights", "hf-hub:someone/xception-3", "--format", "torchscript", "--out",
                 str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "hf-hub:someone/xception-3: input image size 80 (the weights' own), crop pct 0.95" in stdout, stdout
    assert f"wrote {out} (torchscript, BatchNorm folded, input Nx3x80x80 in [-1, 1], 3 classes)" in stdout, stdout
    _, meta = load_torchscript(str(out))
    assert (meta["image_size"], meta["crop_pct"], meta["source_format"]) == (80, 0.95, "timm")


def test_train_resume_by_name_is_refused_and_pretrained_by_name_is_no_path(tmp_path, capsys):
    from xception.config import Config

    for name in ("imagenet", "hf-hub:someone/xception-3"):
        msg = cli_error(capsys, "train", "--data_path", tmp_path, "--resume", name, "--output-dir", tmp_path / "o")
        assert msg == (f"xception: error: --resume {name}: published weights hold no training state to continue; "
                       f"train from them with --pretrained {name}")
    for name in ("imagenet", "keras", "hf-hub:someone/xception-3", "hf-hub:someone/xception-3@v1"):
        assert hub.is_name(name)
        Config(pretrained=name).validate()  # a name, not a file: the weights reader downloads it
    for path in ("./imagenet", "imagenet.pth", "hub:x/y"):
        assert not hub.is_name(path)
        assert user_error(Config(pretrained=path).validate) == f"--pretrained {path}: no such file"
    Config(resume="auto").validate()


def test_a_repo_asking_for_preprocessing_we_cannot_do_is_refused_in_one_line(fake_hub, tmp_path, capsys):
    fake, _ = fake_hub
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    fake.repos["someone/imagenet-mean"] = {"config.json": repo_config(3, **imagenet), "model.safetensors": b"w"}
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(img)
    msg = cli_error(capsys, "predict", img, "--weights", "hf-hub:someone/imagenet-mean")
    assert msg == ("xception: error: --weights hf-hub:someone/imagenet-mean: someone/imagenet-mean's config.json: "
                   "pretrained_cfg asks for mean [0.485, 0.456, 0.406], which xception cannot honour (pixels are "
                   "always normalised with mean 0.5 and std 0.5, to [-1, 1]); these weights would be fed other "
                   "inputs than they were trained on"), msg
    for repo, cfg, said in (("std", {"std": [0.25] * 3}, "std [0.25, 0.25, 0.25]"),
                            ("bilinear", {"interpolation": "bilinear"}, 'interpolation "bilinear"'),
                            ("squash", {"crop_mode": "squash"}, 'crop_mode "squash"'),
                            ("oblong", {"input_size": [3, 299, 320]}, "input_size [3, 299, 320]"),
                            ("tiny", {"test_input_size": [3, 64, 64]}, "test_input_size [3, 64, 64]"),
                            ("crop", {"crop_pct": 1.2}, "crop_pct 1.2")):
        fake.repos[f"someone/{repo}"] = {"config.json": repo_config(3, **cfg), "model.safetensors": b"w"}
        msg = user_error(hub.resolve_pretrained, f"hf-hub:someone/{repo}")
        assert msg.startswith(f"--pretrained hf-hub:someone/{repo}: someone/{repo}'s config.json: pretrained_cfg "
                              f"asks for {said}, which xception cannot honour ("), msg
    assert fake.gets("model.safetensors") == 0  # refused before the weights were downloaded
    # what we can honour is taken: the test_ settings where given (timm evaluates with them)
    fake.repos["someone/test-size"] = {"config.json": repo_config(3, test_input_size=[3, 96, 96], test_crop_pct=1.0),
                                       "model.safetensors": b"w"}
    path, _ = hub.resolve_pretrained("hf-hub:someone/test-size")
    assert hub.preprocessing_of(path) == {"image_size": 96, "crop_pct": 1.0}
    assert hub.preprocessing_of(str(tmp_path / "other.pth")) == {}


def test_average_refuses_a_name(tmp_path, capsys):
    for name in ("imagenet", "hf-hub:someone/xception-3"):
        msg = cli_error(capsys, "average", name, "-o", tmp_path / "mean.pth.tar")
        assert msg == (f"xception: error: checkpoint {name}: published weights by name are not checkpoints of ours; "
                       f"xception average takes checkpoints of one network and class list (e.g. a run's kept "
                       f"epochs): train from {name} with --pretrained {name} and average that run's checkpoints")
