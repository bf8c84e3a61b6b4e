"""What an evaluation's per-image probabilities say, as numbers: the per-class table, the run-level
summary, binary and one-vs-rest ROC figures with operating points, calibration (expected calibration error,
a fitted temperature) and the same figures at group level (frames of a video, images of a patient).

Everything is computed from arrays by scikit-learn where it has the metric, so that the report equals what a
user gets from `predictions.csv` with scikit-learn. No files are written here (evalreport.py writes them).

Conventions: probabilities are softmax (single-label) or per-class sigmoid (multi-label) of the logits
divided by the temperature; figures are fractions in [0, 1] here (the report prints percents where the
epoch line does). Classes without a positive are left out of macro averages of AP and AUC (they are undefined
there) and counted with F1 0 in the per-class table's macro F1, as scikit-learn's zero_division=0 does.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) report ECE


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64) / temperature))


def per_class(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Single-label: precision, recall, F1 and support of every class (arrays, class order) and the top-1
    predictions, by scikit-learn's precision_recall_fscore_support."""
    from sklearn.metrics import precision_recall_fscore_support

    classes = np.arange(probs.shape[1])
    pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(targets, pred, labels=classes, zero_division=0)
    return {"precision": p, "recall": r, "f1": f, "support": s, "pred": pred}


def summary(probs: np.ndarray, targets: np.ndarray, positive: int | None = None, target_fpr: float = 0.01) -> dict:
    """Single-label run-level figures: top1, top5, macro_f1, weighted_f1, balanced_acc, ece, and roc_auc /
    average_precision (two classes or `positive`: that class against the rest, with operating points; more
    classes: macro one-vs-rest AUC over the classes present)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

    classes = np.arange(probs.shape[1])
    pred = probs.argmax(axis=1)
    out = {"images": int(len(targets)),
           "top1": float(np.mean(pred == targets)),
           "top5": float(top_k_accuracy_score(targets, probs, k=5, labels=classes)) if len(classes) > 5 else 1.0,
           "macro_f1": float(f1_score(targets, pred, labels=classes, average="macro", zero_division=0)),
           "weighted_f1": float(f1_score(targets, pred, labels=classes, average="weighted", zero_division=0)),
           "balanced_acc": float(balanced_accuracy_score(targets, pred)),
           "ece": expected_calibration_error(probs, targets)[0]}
    if positive is None and len(classes) == 2:
        positive = 1
    if positive is not None:
        out.update(binary(probs[:, positive], targets == positive, target_fpr))
    else:
        out["roc_auc"] = macro_ovr_auc(probs, targets)
    return out


def macro_ovr_auc(probs: np.ndarray, targets: np.ndarray):
    """The mean over classes with both positives and negatives of each class's ROC-AUC against the rest
    (scikit-learn's roc_auc_score(multi_class="ovr", average="macro") when every class is present)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(targets == c, probs[:, c]) for c in range(probs.shape[1])
            if 0 < np.sum(targets == c) < len(targets)]
    return float(np.mean(aucs)) if aucs else None


def binary(scores: np.ndarray, positive: np.ndarray, target_fpr: float = 0.01) -> dict:
    """ROC-AUC and average precision of `scores` for the boolean `positive`, the curves, and three operating
    points, each a threshold (predict positive when score >= it) with its precision, recall (= TPR) and FPR:
    the highest recall at FPR <= target_fpr, the equal error rate (FPR = 1 - TPR), the best F1."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    if positive.all() or not positive.any():
        return {"roc_auc": None, "average_precision": None, "operating_points": {}}
    fpr, tpr, thr = roc_curve(positive, scores)
    prec, rec, pr_thr = precision_recall_curve(positive, scores)
    allowed = np.flatnonzero(fpr <= target_fpr)
    at_fpr = allowed[np.argmax(tpr[allowed])]
    eer = int(np.argmin(np.abs(fpr - (1 - tpr))))
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    best = float(pr_thr[int(np.argmax(f1))])
    points = {f"fpr<={target_fpr:g}": operating_point(scores, positive, float(thr[at_fpr])),
              "eer": operating_point(scores, positive, float(thr[eer])),
              "best_f1": operating_point(scores, positive, best)}
    points["eer"]["eer"] = float((fpr[eer] + 1 - tpr[eer]) / 2)
    return {"roc_auc": float(roc_auc_score(positive, scores)),
            "average_precision": float(average_precision_score(positive, scores)),
            "operating_points": points, "curves": {"roc": (fpr, tpr), "pr": (rec, prec)}}


def operating_point(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    picked = scores >= threshold
    tp, fp = int(np.sum(picked & positive)), int(np.sum(picked & ~positive))
    fn, tn = int(np.sum(~picked & positive)), int(np.sum(~picked & ~positive))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"threshold": threshold if np.isfinite(threshold) else None, "precision": precision, "recall": recall,
            "fpr": fp / (fp + tn) if fp + tn else 0.0,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> tuple:
    """(ECE, per-bin rows). Each image's confidence is its top probability, correct when that class is its
    label; images fall into `bins` equal-width bins over (0, 1] ((b/B, (b+1)/B]); ECE = sum over bins of
    (images in the bin / images) x |accuracy in the bin - mean confidence in the bin|."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == targets
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        acc = float(correct[inside].mean()) if n else None
        conf = float(confidence[inside].mean()) if n else None
        rows.append({"low": b / bins, "high": (b + 1) / bins, "images": n, "accuracy": acc, "confidence": conf})
        if n:
            ece += n / len(targets) * abs(acc - conf)
    return float(ece), rows


def multilabel(probs: np.ndarray, truth: np.ndarray, threshold: float) -> tuple:
    """(per-class table, summary) of a multi-label evaluation: per class AP (None without a positive),
    precision, recall, F1 of the labels above `threshold`, support; map (over classes with a positive),
    f1_micro, f1_macro (over the same classes), exact-match accuracy."""
    from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

    truth = truth.astype(bool)
    picked = probs > threshold
    present = truth.any(axis=0)
    p, r, f, s = precision_recall_fscore_support(truth, picked, average=None, zero_division=0)
    ap = [float(average_precision_score(truth[:, c], probs[:, c])) if present[c] else None
          for c in range(probs.shape[1])]
    table = {"ap": ap, "precision": p, "recall": r, "f1": f, "support": s, "pred": picked}
    out = {"images": int(len(truth)), "map": 0.0, "f1_micro": 0.0, "f1_macro": 0.0,
           "exact_match": float(np.mean((picked == truth).all(axis=1))) if len(truth) else 0.0}
    if present.any():
        out["map"] = float(np.mean([a for a in ap if a is not None]))
        out["f1_micro"] = float(f1_score(truth, picked, average="micro", zero_division=0))
        out["f1_macro"] = float(f1_score(truth[:, present], picked[:, present], average="macro", zero_division=0))
    return table, out


def by_group(probs: np.ndarray, targets: np.ndarray, groups: list) -> tuple:
    """(group names in order of first appearance, their probabilities, their targets). A group's
    probabilities are the mean of its images' (the convention of video-level deepfake detection); its label
    is the most common label of its images (ties: the first class), or with multi-hot targets the union."""
    names, index = [], {}
    for g in groups:
        if g not in index:
            index[g] = len(names)
            names.append(g)
    member = np.array([index[g] for g in groups])
    counts = np.bincount(member, minlength=len(names))[:, None]
    mean = np.zeros((len(names), probs.shape[1]))
    np.add.at(mean, member, probs)
    mean /= counts
    if targets.ndim == 2:
        labels = np.zeros((len(names), targets.shape[1]), dtype=targets.dtype)
        np.maximum.at(labels, member, targets)
    else:
        votes = np.zeros((len(names), probs.shape[1]), dtype=np.int64)
        np.add.at(votes, (member, targets), 1)
        labels = votes.argmax(axis=1)
    return names, mean, labels


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T > 0 minimising the mean negative log-likelihood of softmax(logits / T) (Guo et al.
    2017): one scalar, so the ranking of the classes, and top-1, never change. Fitted on log T by L-BFGS."""
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.int64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    return float(log_t.exp().item())
