"""Published weights by name: `--pretrained imagenet`, `--pretrained keras` and `--pretrained hf-hub:ORG/REPO[@REV]`
become a local file (downloaded once, then read from a cache), which the ordinary weights reader then opens.

- imagenet: timm's weights of the architecture on the Hugging Face Hub (HUB_REPOS; the original Xception is
  timm/legacy_xception.tf_in1k), fetched with huggingface_hub's `hf_hub_download`: its cache (HF_HOME,
  HF_HUB_CACHE), HF_HUB_OFFLINE and HF_ENDPOINT apply as for any Hub download. model.safetensors, or
  pytorch_model.bin where the repository has no safetensors file.
- keras: the author's Keras applications .h5 (the Xception of the paper), from the URL keras.applications
  downloads it from, with torch.hub's download helper into torch.hub.get_dir()/checkpoints (TORCH_HOME). Its
  publisher gives an md5, not a sha256 (keras/src/applications/xception.py: `file_hash=` of 32 hex digits, which
  keras' get_file checks as md5), so the md5 it publishes is what is checked, before the file enters the cache.
  XCEPTION_KERAS_BASE_URL replaces the folder URL (a mirror, or the tests' loopback server).
- hf-hub:ORG/REPO[@REV]: any timm-style repository whose config.json names one of our architectures
  (TIMM_ARCHS), with model.safetensors or pytorch_model.bin, at a branch, tag or commit. Its "pretrained_cfg"
  says how the weights want their input preprocessed: its input size and crop (the test_ ones where given, as
  timm evaluates) are honoured, as a checkpoint's saved settings are (`preprocessing_of` hands them to the
  weights reader, whence eval, predict and export take them; --image-size/--crop-pct still win); what we cannot
  honour (a mean or std other than 0.5, an interpolation other than bicubic, a crop mode other than center, a
  non-square input) is refused in one line before the weights are downloaded.

Every failure (no network, an offline cache miss, an HTTP error, a bad checksum) is one UserError line: what was
tried, why it failed, and how to pass a local file instead. A spec that is not one of these names is a path:
`resolve_pretrained` returns None and the caller reads the file (so a file named `imagenet` is ./imagenet).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from importlib import resources

from ..config import MIN_INPUT_SIZE, PIXEL_MEAN, PIXEL_STD, UserError

# Our architecture -> the timm repository on the Hugging Face Hub that `--pretrained imagenet` downloads.
HUB_REPOS = {
    "xception": "timm/legacy_xception.tf_in1k",
    "xception41": "timm/xception41.tf_in1k",
    "xception65": "timm/xception65.ra3_in1k",
    "xception71": "timm/xception71.tf_in1k",
    "xception41p": "timm/xception41p.ra3_in1k",
    "xception65p": "timm/xception65p.ra3_in1k",
}
# The "architecture" of a timm repository's config.json -> our architecture. timm named the original Xception
# "xception" before it renamed it "legacy_xception" (timm 0.6), so both are ours.
TIMM_ARCHS = {
    "legacy_xception": "xception",
    "xception": "xception",
    "xception41": "xception41",
    "xception65": "xception65",
    "xception71": "xception71",
    "xception41p": "xception41p",
    "xception65p": "xception65p",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
HF_PREFIX = "hf-hub:"
NAMES = ("imagenet", "keras", HF_PREFIX + "ORG/REPO[@REV]")

# The author's Keras applications weights, as keras 3 downloads them (keras/src/applications/xception.py:
# WEIGHTS_PATH and its file_hash). The publisher gives an md5 only.
KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
KERAS_BASE_ENV = "XCEPTION_KERAS_BASE_URL"
KERAS_FILE = "xception_weights_tf_dim_ordering_tf_kernels.h5"
KERAS_MD5 = "0a58e3b7378bc2990ea3b43d5981f1f6"

IMAGENET_CLASSES_FILE = "imagenet_classes.txt"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

EVAL_INTERPOLATION = "bicubic"  # how data/transforms.py resizes an eval image (then a center crop)
# The local weights files of hf-hub repositories resolved in this process -> the eval input settings their
# config.json's pretrained_cfg gives ({"image_size", "crop_pct"}). A snapshot path belongs to one commit, so
# the file and its config.json never part; kept so that a caller that resolves the name first and reads the
# file later (predict) still gets them.
_PREPROCESSING: dict = {}


def is_name(spec: str) -> bool:
    """Whether `spec` names published weights rather than a file."""
    return spec in ("imagenet", "keras") or spec.startswith(HF_PREFIX)


def resolve_pretrained(spec: str, arch: str = "xception", flag: str = "--pretrained") -> tuple[str, str] | None:
    """(local file, architecture of its weights) for a name of published weights, downloading it unless cached;
    None when `spec` is not such a name (a path: the caller reads it as a file). `arch` chooses the ImageNet
    weights of "imagenet"; an hf-hub repository says its own architecture, which may differ from `arch`
    (the caller decides whether that is welcome)."""
    if spec == "imagenet":
        if arch not in HUB_REPOS:
            raise UserError(f"{flag} imagenet: no ImageNet weights known for the architecture {arch}; "
                            f"known: {', '.join(HUB_REPOS)}")
        return _hub_weights(HUB_REPOS[arch], None, spec, flag), arch
    if spec == "keras":
        if arch != "xception":
            raise UserError(f"{flag} keras: the Keras applications weights are the original Xception's, not "
                            f"{arch}'s; use {flag} imagenet for {arch}")
        return _keras_weights(flag), "xception"
    if spec.startswith(HF_PREFIX):
        repo, at, revision = spec[len(HF_PREFIX):].partition("@")
        if not _REPO_ID.fullmatch(repo) or (at and not revision):
            raise UserError(f"{flag} {spec}: expected {HF_PREFIX}ORG/REPO or {HF_PREFIX}ORG/REPO@REVISION")
        revision = revision or None
        ours, settings = _hub_config(repo, revision, spec, flag)  # refused here before a weights download
        path = _hub_weights(repo, revision, spec, flag)
        _PREPROCESSING[os.path.abspath(path)] = settings
        return path, ours
    return None


def preprocessing_of(path: str) -> dict:
    """The eval input settings ({"image_size": N, "crop_pct": F}, either may be absent) that the pretrained_cfg
    of the hf-hub repository whose weights file `path` is gives, and its config's label names ("class_names",
    where it has them); {} for any other file."""
    return dict(_PREPROCESSING.get(os.path.abspath(path), {}))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (sorted WordNet ids, as timm, torchvision
    and keras number them). Shipped with the package (xception/imagenet_classes.txt, torchvision's short names),
    so labelling needs no download and works offline: the list is fixed, and a copy from the network (keras'
    imagenet_class_index.json) would add a failure mode and nothing else."""
    text = resources.files("xception").joinpath(IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    names = [line for line in text.splitlines() if line]
    if len(names) != 1000:
        raise RuntimeError(f"{IMAGENET_CLASSES_FILE} holds {len(names)} names, not 1000: a damaged install")
    return names


# --- the Hugging Face Hub ---


def _hub_config(repo: str, revision: str | None, spec: str, flag: str) -> tuple[str, dict]:
    """(our architecture named by the timm config.json of `repo`, the eval settings of its pretrained_cfg)."""
    path = _hub_file(repo, "config.json", revision, spec, flag)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {spec}: {repo}'s config.json is not readable JSON ({type(e).__name__})")
    name = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise UserError(f"{flag} {spec}: {repo}'s config.json names no \"architecture\"; expected a timm-style "
                        f"repository of one of {', '.join(sorted(TIMM_ARCHS))}")
    ours = TIMM_ARCHS.get(name.split(".")[0])  # a name with a pretrained tag (arch.tag) is the arch
    if ours is None:
        raise UserError(f"{flag} {spec}: {repo} holds a {name} model, not one of ours; its config.json must name "
                        f"one of {', '.join(sorted(TIMM_ARCHS))}")
    settings = _preprocessing(config.get("pretrained_cfg"), f"{flag} {spec}: {repo}'s config.json")
    labels = config.get("label_names")  # timm's field; xception export --format hf writes it
    if isinstance(labels, list) and labels and all(isinstance(n, str) for n in labels):
        settings["class_names"] = labels
    return ours, settings


def _preprocessing(pretrained, where: str) -> dict:
    """{"image_size", "crop_pct"} from a timm pretrained_cfg (absent keys: nothing said, nothing taken); a
    setting our eval transform cannot follow is a UserError, since the weights would see other inputs than the
    ones they were trained on. `where` starts the message."""
    if pretrained is None:
        return {}
    if not isinstance(pretrained, dict):
        raise UserError(f"{where}: its \"pretrained_cfg\" is not a JSON object")

    def refuse(key, value, what):
        raise UserError(f"{where}: pretrained_cfg asks for {key} {json.dumps(value)}, which xception cannot "
                        f"honour ({what}); these weights would be fed other inputs than they were trained on")

    for key, ours in (("mean", PIXEL_MEAN), ("std", PIXEL_STD)):
        value = pretrained.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and abs(v - ours) < 1e-4 for v in values):
            refuse(key, value, f"pixels are always normalised with mean {PIXEL_MEAN} and std {PIXEL_STD}, "
                               f"to [-1, 1]")
    interpolation = pretrained.get("interpolation")
    if interpolation is not None and interpolation != EVAL_INTERPOLATION:
        refuse("interpolation", interpolation, f"eval images are resized {EVAL_INTERPOLATION}")
    crop_mode = pretrained.get("crop_mode")
    if crop_mode is not None and crop_mode != "center":
        refuse("crop_mode", crop_mode, "eval images are resized, then center-cropped")
    settings = {}
    size_key = "test_input_size" if pretrained.get("test_input_size") is not None else "input_size"
    size = pretrained.get(size_key)
    if size is not None:
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size)
                and size[0] == 3 and size[1] == size[2]):
            refuse(size_key, size, "it takes square RGB inputs: [3, N, N]")
        if size[1] < MIN_INPUT_SIZE:
            refuse(size_key, size, f"the smallest input is {MIN_INPUT_SIZE} px")
        settings["image_size"] = size[1]
    crop_key = "test_crop_pct" if pretrained.get("test_crop_pct") is not None else "crop_pct"
    crop = pretrained.get(crop_key)
    if crop is not None:
        if not (isinstance(crop, (int, float)) and 0 < crop <= 1):
            refuse(crop_key, crop, "a crop fraction is in (0, 1]")
        settings["crop_pct"] = float(crop)
    return settings


def _hub_weights(repo: str, revision: str | None, spec: str, flag: str) -> str:
    """The local path of the repository's model.safetensors, or of its pytorch_model.bin where it has none."""
    missing = []
    for filename in WEIGHT_FILES:
        path = _hub_file(repo, filename, revision, spec, flag, missing)
        if path is not None:
            return path
    from huggingface_hub import constants

    why = (f"HF_HUB_OFFLINE is set and neither file is in the cache ({constants.HF_HUB_CACHE})"
           if _offline(missing[0]) else "the repository holds neither file")
    raise _hub_error(missing[0], repo, " or ".join(WEIGHT_FILES), revision, spec, flag, why=why) from None


def _hub_file(repo: str, filename: str, revision: str | None, spec: str, flag: str,
              missing: list | None = None) -> str | None:
    """The local path of one file of the repository. With `missing` given, a file the repository lacks (or
    that HF_HUB_OFFLINE keeps out of reach) is appended there as its error and None is returned; any other
    failure is a one-line error."""
    try:
        return _download(repo, filename, revision)
    except Exception as e:
        if not _handled(e):
            raise
        if missing is not None and _file_missing(e):
            missing.append(e)
            return None
        raise _hub_error(e, repo, filename, revision, spec, flag) from None


def _download(repo: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=revision)


def _chain(e: BaseException) -> list:
    """`e` and the exceptions it was raised from, outermost first."""
    out = []
    while e is not None and all(e is not x for x in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _transport_errors() -> tuple:
    """The network errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x, requests before)."""
    found = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "RequestException")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name, None))
    return tuple(c for c in found if isinstance(c, type))


def _handled(e: Exception) -> bool:
    """Whether `e` is a failure of the download (network, Hub, cache, disk) rather than a bug."""
    from huggingface_hub import errors

    return isinstance(e, (errors.HfHubHTTPError, errors.EntryNotFoundError, errors.HFValidationError, OSError)
                      + _transport_errors())


def _offline(e: BaseException) -> bool:
    from huggingface_hub import constants, errors

    return constants.is_offline_mode() or any(isinstance(x, errors.OfflineModeIsEnabled) for x in _chain(e))


def _file_missing(e: BaseException) -> bool:
    """The repository lacks the file, or HF_HUB_OFFLINE is set and the cache lacks it: try the next file."""
    from huggingface_hub import errors

    remote = getattr(errors, "RemoteEntryNotFoundError", None)
    if remote is not None and isinstance(e, remote):
        return True
    return isinstance(e, errors.LocalEntryNotFoundError) and _offline(e)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# The Hub's errors, most specific first, and what each tells the user ({status}: the HTTP status).
_HUB_REASONS = (
    ("GatedRepoError", "the repository is gated (HTTP {status}): accept its terms on the Hub and log in "
                       "(hf auth login)"),
    ("RepositoryNotFoundError", "no such repository, or a private one (HTTP {status})"),
    ("RevisionNotFoundError", "the repository has no such revision (HTTP {status})"),
    ("HFValidationError", "not a valid repository name or revision ({first})"),
    ("FileMetadataError", "the server's answer lacks the Hub's file headers (X-Repo-Commit, ETag): is HF_ENDPOINT "
                          "a Hub?"),
)


def _hub_reason(x: BaseException, errors) -> str | None:
    """What one exception of a chain says about the download, or None for one that says nothing."""
    status = getattr(getattr(x, "response", None), "status_code", None)
    for name, text in _HUB_REASONS:
        kind = getattr(errors, name, None)
        if kind is not None and isinstance(x, kind):
            return text.format(status=status, first=_first_line(x))
    if isinstance(x, errors.EntryNotFoundError) and not isinstance(x, errors.LocalEntryNotFoundError):
        return f"the repository has no such file (HTTP {status})"
    if isinstance(x, errors.HfHubHTTPError):
        return f"HTTP {status}" if status else _first_line(x)
    transport = _transport_errors()
    if transport and isinstance(x, transport):
        return f"network error: {_first_line(x)}"
    return None


def _hub_why(e: BaseException) -> str:
    from huggingface_hub import constants, errors

    if _offline(e):
        return f"HF_HUB_OFFLINE is set and the file is not in the cache ({constants.HF_HUB_CACHE})"
    for x in _chain(e):
        if (reason := _hub_reason(x, errors)) is not None:
            return reason
    return _first_line(e)


def _hub_error(e: BaseException, repo: str, filename: str, revision: str | None, spec: str, flag: str,
               why: str | None = None) -> UserError:
    from huggingface_hub import constants

    at = f"@{revision}" if revision else ""
    url = f"{constants.ENDPOINT}/{repo}/resolve/{revision or 'main'}/{WEIGHT_FILES[0]}"  # the file to pass
    return UserError(f"{flag} {spec}: cannot get {filename} of {repo}{at} from the Hugging Face Hub "
                     f"({constants.ENDPOINT}): {why or _hub_why(e)}; to use a local file instead, download {url} "
                     f"yourself and pass {flag} PATH")


# --- the Keras applications file ---


def keras_url() -> str:
    """Where `--pretrained keras` downloads from: keras' own URL, or XCEPTION_KERAS_BASE_URL's folder."""
    base = os.environ.get(KERAS_BASE_ENV) or KERAS_BASE_URL
    return base.rstrip("/") + "/" + KERAS_FILE


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # the publisher's checksum, not a security boundary
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _keras_weights(flag: str) -> str:
    """The Keras .h5 in torch.hub's checkpoint folder: reused when its md5 is right, else downloaded, checked
    and only then moved into place (a bad download never enters the cache)."""
    import http.client

    import torch.hub

    url = keras_url()
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    dst = os.path.join(folder, KERAS_FILE)
    advice = f"to use a local file instead, download {url} yourself and pass {flag} PATH"
    if os.path.isfile(dst) and _md5(dst) == KERAS_MD5:
        return dst
    part = f"{dst}.{os.getpid()}.download"
    try:
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(url, part, progress=sys.stderr.isatty())
        got = _md5(part)
        if got != KERAS_MD5:
            raise UserError(f"{flag} keras: {url} gave a file whose md5 is {got}, not the published {KERAS_MD5} "
                            f"(a damaged or substituted download; nothing was cached); {advice}")
        os.replace(part, dst)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise UserError(f"{flag} keras: cannot download {url}: {_url_why(e)}; {advice}") from None
    finally:
        if os.path.exists(part):
            os.remove(part)
    return dst


def _url_why(e: BaseException) -> str:
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"network error: {e.reason}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f' ({e.filename})' if e.filename else ''}"
    return _first_line(e)
