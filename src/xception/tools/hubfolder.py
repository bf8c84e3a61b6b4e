"""`xception export --format hf --out DIR`: a folder in the layout of a timm repository on the Hugging Face Hub,
and `xception push DIR --repo ORG/NAME`, which uploads it.

The folder holds `config.json` (timm's: architecture, num_classes, label_names, pretrained_cfg with the input
size, crop, mean/std and interpolation the weights were evaluated with), `model.safetensors` (the weights under
timm's names for the architecture: `legacy_xception` for ours, the aligned family's own names), and `README.md`, a
model card written from what the run left: its settings, the data it was trained on, metrics.csv's final and
best rows, and the command that trained it. timm reads the folder (`timm.create_model("local-dir:DIR",
pretrained=True)`) and, once uploaded, the repository (`hf-hub:ORG/NAME`); so do our `--pretrained
hf-hub:ORG/NAME` and `--weights hf-hub:ORG/NAME`, which also read the label names back.

A run's own settings that timm has no field for (multi-label, threshold, temperature) are kept under the
config's "xception" key, which timm ignores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import MISSING, fields

from ..checkpoint import unwrap
from ..config import PIXEL_MEAN, PIXEL_STD, Config, UserError
from ..files import WriteError, check_new_path, show
from ..model import ports
from ..model.deploy import label_mode, temperature_of
from ..data.folder import IMG_EXTENSIONS
from ..model.hub import EVAL_INTERPOLATION
from ..model.weights import build_model, eval_settings, read_weights, weights_choice
from ..report import read_metrics
from .predict import class_names_for

CARD = "README.md"
FILES = ("config.json", "model.safetensors", CARD)
# What timm's pretrained_cfg says of each family's first conv and classifier (its fine-tuning helpers read them).
TIMM_NAME = {"xception": "legacy_xception"}  # the aligned family's names are timm's
FIRST_CONV = {"xception": "conv1"}
CLASSIFIER = {"xception": "fc"}
SHOWN_METRICS = ("top1", "top5", "balanced_acc", "map", "f1_micro", "f1_macro", "ema_top1", "ema_map", "val_loss")


def export_hf(weights: str, out: str, choice: str = "best", flag_names: dict | None = None,
              license_id: str = "other", log=print) -> None:
    """Write the new folder `out` (never over a file or folder) for `weights`. `flag_names`
    ({Config field: the train flag's long spellings}) spells the training command in the card."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("export --format hf needs safetensors (pip install safetensors)") from None
    loaded = read_weights(weights, choice=choice)
    if loaded.choice_note:
        log(loaded.choice_note)
    if loaded.keras_exact:
        raise UserError(f"--weights {weights}: these weights use Keras numerics (BatchNorm eps 1e-3, TensorFlow's "
                        f"'same' pooling), which timm's legacy_xception does not reproduce; fine-tune them with "
                        f"xception train first")
    check_new_path(out, "export --format hf")
    model = unwrap(build_model(loaded, log=log)).eval()
    size, crop_pct = eval_settings(loaded.args, None, None, weights, log, loaded.arch)
    names = class_names_for(loaded.class_names, model.num_classes)  # predict's: ImageNet's for 1000 unnamed
    state = {k: v.detach().contiguous() for k, v in ports.to_timm(model.state_dict(), loaded.arch).items()}
    config = timm_config(loaded.arch, model, names, size, crop_pct, license_id, loaded.args)
    card = model_card(weights, loaded, config, flag_names or {})
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".hf-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would follow the folder to its place
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, CARD), "w", encoding="utf-8") as f:
            f.write(card)
        os.rename(tmp, out)  # the whole folder appears at once
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only folder: name the folder
            raise WriteError(out, e) from None
        raise
    log(f"wrote {out}/ ({', '.join(FILES)}): {config['architecture']} in timm's names, {model.num_classes} "
        f"classes, input {size} px, crop {crop_pct:g}; timm reads it as local-dir:{out}")


def timm_config(arch: str, model, names: list, size: int, crop_pct: float, license_id: str, args: dict) -> dict:
    multi_label, threshold = label_mode(args)
    architecture = TIMM_NAME.get(arch, arch)
    pretrained_cfg = {
        "tag": "xception", "custom_load": False, "input_size": [3, size, size], "fixed_input_size": False,
        "interpolation": EVAL_INTERPOLATION, "crop_pct": crop_pct, "crop_mode": "center",
        "mean": [PIXEL_MEAN] * 3, "std": [PIXEL_STD] * 3, "num_classes": model.num_classes,
        "pool_size": [-(-size // 32)] * 2, "first_conv": FIRST_CONV.get(arch, "stem.0.conv"),
        "classifier": CLASSIFIER.get(arch, "head.fc"), "license": license_id,
    }
    return {"architecture": architecture, "num_classes": model.num_classes, "num_features": model.num_features,
            "global_pool": "avg", "label_names": [str(n) for n in names], "pretrained_cfg": pretrained_cfg,
            "xception": {"arch": arch, "multi_label": multi_label, "threshold": threshold if multi_label else None,
                         "temperature": temperature_of(args)}}


def training_command(args: dict, flag_names: dict) -> str | None:
    """`xception train ...` with the flags the run was given (its saved `explicit` list; a run made without
    the CLI, such as the demo's, lists every setting that differs from Config's default), else None."""
    if not args or not flag_names:
        return None
    given = args.get("explicit") or [f.name for f in fields(Config) if f.name in args and f.default is not MISSING
                                     and _differs(args[f.name], f.default)]
    words = ["xception", "train"]
    for name in ("data_path", *given):
        value, spellings = args.get(name), flag_names.get(name) or []
        if not spellings or name in ("output_dir", "explicit") or (name == "data_path" and words[2:]):
            continue
        negative = next((o for o in spellings if o.startswith("--no-")), None)
        if value is None or (value is False and negative is None):
            continue
        if isinstance(value, bool):
            words.append(spellings[0] if value else negative)
        else:
            words += [spellings[0], *(str(v) for v in value)] if isinstance(value, (list, tuple)) else [
                spellings[0], str(value)]
    return " ".join(words)


def _differs(value, default) -> bool:
    return (list(value) if isinstance(value, (list, tuple)) else value) != (
        list(default) if isinstance(default, (list, tuple)) else default)


def _metrics_rows(weights: str) -> list:
    """The final and the best rows of the metrics.csv beside a checkpoint ([] when there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), "metrics.csv")
    if not os.path.isfile(path):
        return []
    table = read_metrics(path)
    epochs = table.get("epoch") or []
    if not epochs:
        return []
    score = next((c for c in ("map", "top1") if any(v is not None for v in table.get(c, []))), None)
    last = len(epochs) - 1
    rows = [("final", last)]
    if score is not None:
        best = max(range(len(epochs)), key=lambda i: -1 if table[score][i] is None else table[score][i])
        rows.append((f"best ({score})", best))
    shown = [c for c in SHOWN_METRICS if any(v is not None for v in table.get(c, []))]
    out = ["| row | epoch | " + " | ".join(shown) + " |", "| --- | --- |" + " --- |" * len(shown)]
    for label, i in rows:
        cells = ["" if table[c][i] is None else f"{table[c][i]:.3f}" for c in shown]
        out.append(f"| {label} | {int(epochs[i])} | " + " | ".join(cells) + " |")
    return out


def _train_images(data_path) -> int | None:
    """How many images an image folder's train/ holds now (None for any other data, or a folder gone)."""
    root = os.path.join(str(data_path), "train")
    if not os.path.isdir(root):
        return None
    count = 0
    for _, _, files in os.walk(root, followlinks=True):
        count += sum(1 for n in files if n.lower().endswith(IMG_EXTENSIONS))
    return count


def _outputs_line(own: dict) -> str:
    said = (f"multi-label: a sigmoid per class, a label above {own['threshold']:g}" if own["multi_label"]
            else "single-label: a softmax over the classes")
    if own["temperature"] != 1:
        said += f"; logits divided by the calibrated temperature {own['temperature']:g}"
    return f"- Outputs: logits; {said}"


def _run_lines(args: dict) -> list:
    if not args:
        return []
    count = _train_images(args.get("data_path"))
    size = f" ({count} training images in its train/ today)" if count else ""
    return [f"- Training data: `{args.get('data_path')}`{size}",
            f"- Recipe: {args.get('recipe') or 'none (flags)'}; {args.get('epochs')} epochs, batch "
            f"{args.get('batch_size')}, {args.get('opt')} lr {args.get('lr')} ({args.get('sched')}), label smoothing "
            f"{args.get('label_smoothing')}, mixup {args.get('mixup')}, CutMix {args.get('cutmix')}, EMA "
            f"{'on' if args.get('ema') else 'off'}"]


def model_card(weights: str, loaded, config: dict, flag_names: dict) -> str:
    pre, own, names = config["pretrained_cfg"], config["xception"], config["label_names"]
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
    lines = ["---", f"license: {pre['license']}", "library_name: timm", "tags:", "- image-classification",
             "- timm", "- xception", "---", "",
             f"# {config['architecture']} ({own['arch']}), {config['num_classes']} classes", "",
             f"Exported by `xception export --format hf` from `{os.path.basename(weights)}`.", "",
             f"- Classes: {shown}",
             f"- Input: {pre['input_size'][1]} px, crop {pre['crop_pct']:g} ({pre['interpolation']} resize, center "
             f"crop), mean and std {PIXEL_MEAN} (pixels to [-1, 1])", _outputs_line(own)]
    lines += _run_lines(loaded.args)
    command = training_command(loaded.args, flag_names)
    if command:
        lines += ["", "Trained by:", "", "```bash", command, "```"]
    metrics = _metrics_rows(weights)
    if metrics:
        lines += ["", "## Results (metrics.csv, percent)", ""] + metrics
    lines += ["", "## Use", "", "```python", "import timm",
              'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)  # or "local-dir:PATH"', "```", "",
              "```bash", "xception predict IMAGE --pretrained hf-hub:ORG/NAME", "```", ""]
    return "\n".join(lines)


def push(folder: str, repo: str, private: bool = False, revision: str | None = None, log=print) -> str:
    """Upload `folder` (written by export --format hf) to the Hub repository `repo`, creating it if needed;
    HF_TOKEN / `hf auth login` and HF_ENDPOINT apply. Returns the commit's URL."""
    missing = [n for n in FILES if not os.path.isfile(os.path.join(folder, n))]
    if not os.path.isdir(folder) or missing:
        raise UserError(f"push {show(folder)}: not a folder written by xception export --format hf (missing "
                        f"{', '.join(missing) or 'the folder'}); write one first")
    try:
        import huggingface_hub as hh
    except ImportError:
        raise UserError("xception push needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        api = hh.HfApi()  # a new client reads the endpoint (HF_ENDPOINT) and token now
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision, repo_type="model",
                                commit_message="xception export --format hf")
    except Exception as e:  # the Hub's HTTP errors, a refused connection, a bad token: one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"push --repo {repo}: the upload failed: {why}") from None
    url = getattr(info, "commit_url", None) or str(info)
    log(f"pushed {folder} to {repo}: {url}")
    return url


def run_push(args) -> int:
    push(args.folder, args.repo, args.private, args.revision)
    return 0


def run_export(args, flag_names: dict) -> int:
    export_hf(args.weights, args.out, weights_choice(args.raw_weights, args.ema_weights), flag_names, args.license)
    return 0
