"""Pictures of a run: training curves from its metrics (report.py reads metrics.csv), and the confusion
matrix of an evaluation. matplotlib (optional: the `interop` extra) is imported inside the functions, on its
file-only Agg backend (no display needed). PNGs are written atomically (files.py)."""

from __future__ import annotations

from .files import atomic_write

CURVES_NAME = "curves.png"
FULL_MATRIX_MAX_CLASSES = 30  # up to this many classes the matrix is drawn with names and counts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: str) -> str:
    """Write the figure (atomically) and free it."""
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        _pyplot().close(fig)
    return out


def write_curves(m: dict, title: str, out: str) -> str:
    """Draw loss, top-1/top-5 (multi-label: mAP and macro F1), learning rate and img/s against epoch (`m`:
    metrics columns) into `out`."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = m["epoch"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (axes[0, 0], "loss", [("train_loss", "train"), ("val_loss", "val")]),
        (axes[0, 1], "val score (%)", [("top1", "top-1"), ("top5", "top-5"), ("map", "mAP"),
                                       ("f1_macro", "F1 macro")]),
        (axes[1, 0], "learning rate (end of epoch)", [("lr", "lr")]),
        (axes[1, 1], "training throughput (img/s)", [("images_per_sec", "img/s")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            values = m.get(key)
            if values is None:
                continue
            pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend()
    key, name = ("map", "mAP") if any(v is not None for v in m.get("map", [])) else ("top1", "top-1")
    best = max(((v, e) for e, v in zip(epochs, m.get(key, [])) if v is not None), default=None)
    fig.suptitle(f"{title}: {len(epochs)} epoch(s)"
                 + (f", best {name} {best[0]:.2f}% at epoch {best[1]:.0f}" if best else ""))
    fig.tight_layout()
    return _save(fig, out)


def most_confused(confusion, class_names, n: int = 20) -> list:
    """[(count, true name, predicted name)] of the largest off-diagonal cells, largest first."""
    import numpy as np

    c = np.array(confusion, dtype=np.int64, copy=True)
    np.fill_diagonal(c, 0)
    flat = np.argsort(c, axis=None)[::-1][:n]
    out = []
    for index in flat:
        t, p = divmod(int(index), c.shape[1])
        if c[t, p] == 0:
            break
        out.append((int(c[t, p]), class_names[t], class_names[p]))
    return out


def write_confusion(confusion, class_names, out: str, title: str = "") -> str:
    """Full matrix (row-normalised colours, counts written in) for a few classes; for many classes the
    matrix as an image without labels beside a bar chart of the most confused pairs."""
    import numpy as np

    plt = _pyplot()
    c = np.asarray(confusion, dtype=np.float64)
    k = len(class_names)
    rows = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    if k <= FULL_MATRIX_MAX_CLASSES:
        size = max(5.0, 0.45 * k + 2.5)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
        im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90 if k > 12 else 0)
        ax.set_yticks(range(k), [str(n) for n in class_names])
        for t in range(k):
            for p in range(k):
                if c[t, p]:
                    ax.text(p, t, f"{int(c[t, p])}", ha="center", va="center", fontsize=8,
                            color="white" if rows[t, p] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    else:
        pairs = most_confused(c, class_names, 25)
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(16, 7.5), gridspec_kw={"width_ratios": [1, 1.2]})
        ax.imshow(np.sqrt(rows), cmap="viridis", interpolation="nearest")
        ax.set_title(f"confusion, {k} classes (sqrt of row fraction)")
        ax.set_xlabel("predicted class index")
        ax.set_ylabel("true class index")
        if pairs:
            labels = [f"{_short(t)} -> {_short(p)}" for _, t, p in pairs][::-1]
            bx.barh(range(len(pairs)), [n for n, _, _ in pairs][::-1], color="tab:red")
            bx.set_yticks(range(len(pairs)), labels, fontsize=8)
        bx.set_title("most confused pairs (true -> predicted), images")
    acc = np.trace(c) / max(c.sum(), 1) * 100
    fig.suptitle((title + ": " if title else "") + f"top-1 {acc:.2f}% over {int(c.sum())} images")
    fig.tight_layout()
    return _save(fig, out)


def _short(name, width: int = 28) -> str:
    name = str(name)
    return name if len(name) <= width else name[:width - 1] + "~"


def write_roc_pr(curves: dict, figures: dict, out: str, title: str = "") -> str:
    """ROC and precision-recall curves of a binary evaluation side by side (`curves`: {"roc": (fpr, tpr),
    "pr": (recall, precision)}), with AUC, AP and the operating points of `figures` marked."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5))
    fpr, tpr = curves["roc"]
    ax.plot(fpr, tpr, label=f"ROC-AUC {figures['roc_auc']:.4f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    recall, precision = curves["pr"]
    bx.step(recall, precision, where="post", label=f"AP {figures['average_precision']:.4f}")
    for name, point in figures["operating_points"].items():
        ax.plot(point["fpr"], point["recall"], "o", label=f"{name}: threshold {point['threshold']:.4g}")
        bx.plot(point["recall"], point["precision"], "o", label=name)
    for axis, x, y in ((ax, "false positive rate", "true positive rate (recall)"), (bx, "recall", "precision")):
        axis.set_xlabel(x)
        axis.set_ylabel(y)
        axis.set_xlim(-0.01, 1.01)
        axis.set_ylim(-0.01, 1.01)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="lower right" if axis is ax else "lower left")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def write_reliability(rows: list, ece: float, out: str, title: str = "") -> str:
    """The reliability diagram: accuracy against mean confidence in each confidence bin (`rows` from
    analysis.expected_calibration_error), the diagonal of perfect calibration, and the bins' image counts."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = rows[0]["high"] - rows[0]["low"]
    filled = [r for r in rows if r["images"]]
    ax.bar([r["low"] for r in filled], [r["accuracy"] for r in filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in the bin")
    ax.plot([r["confidence"] for r in filled], [r["confidence"] for r in filled], "r.", label="mean confidence")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title}{': ' if title else ''}ECE {ece:.4f} ({len(rows)} bins)")
    bx.bar([r["low"] for r in rows], [r["images"] for r in rows], width=width, align="edge", color="tab:grey")
    bx.set_xlabel("confidence (top probability)")
    bx.set_ylabel("images")
    fig.tight_layout()
    return _save(fig, out)


def write_contact_sheet(items: list, out: str, title: str = "", columns: int = 4) -> str:
    """A grid of images (`items`: (path, caption)), e.g. the most confident mistakes of an evaluation."""
    from PIL import Image, ImageOps

    plt = _pyplot()
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, caption) in zip(axes.flat, items):
        with Image.open(path) as img:
            ax.imshow(ImageOps.exif_transpose(img).convert("RGB"))
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)
