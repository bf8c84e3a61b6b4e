"""Skewed classes: --class-weights (balanced or a FILE), --sampler balanced, and the balanced accuracy of
every evaluation (metrics.csv's balanced_acc, the epoch line, `xception eval`)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_class_weight

from conftest import TINY, make_image_folder, read_metrics, run_cli
from xception.config import Config, UserError
from xception.data import build_loaders
from xception.data.loaders import BalancedSampler
from xception.engine import loop
from xception.engine.precision import Precision
from xception.engine.loss import _balanced_weights, build_criterion, read_class_weights
from xception.report import METRICS_FIELDS, epoch_line, read_metrics as report_metrics


def make_skewed_folder(root, train_counts=(40, 2), n_val=10, size=(80, 72), seed=0):
    """DATA/{train,val}/c<i>/<n>.png: class i has train_counts[i] train and n_val val images, coloured as
    make_image_folder colours its classes (channel i % 3 at 200, plus noise)."""
    classes = [f"c{c}" for c in range(len(train_counts))]
    return make_image_folder(root, classes, train_counts, n_val, size, seed, exts=("png",))


def _fake_run(tmp_path, counts=(9, 3), **cfg):
    data = make_skewed_folder(tmp_path / "data", counts, n_val=2, size=(8, 8))
    config = Config(data_path=data, workers=0, check_data=False, batch_size=2, seed=1, image_size=71, crop_pct=1.0,
                    **cfg)
    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, local_world_size=1,
                          distributed=False, is_main=True)
    loaders = build_loaders(config, ctx, need_train=True)
    return SimpleNamespace(cfg=config, ctx=ctx, classes=loaders.classes, train_loader=loaders.train,
                           log=lambda *a: None), loaders


# --class-weights

def test_balanced_class_weights_equal_sklearns_and_reach_thebuild_criterion(tmp_path):
    run, loaders = _fake_run(tmp_path, counts=(9, 3), class_weights="balanced", label_smoothing=0.1)
    assert loaders.train.class_counts == [9, 3]
    expected = compute_class_weight("balanced", classes=np.arange(2), y=np.array([0] * 9 + [1] * 3))
    assert np.allclose(_balanced_weights([9, 3], ["c0", "c1"]), expected)  # 12 / (2 x 9), 12 / (2 x 3)
    criterion = build_criterion(run)
    assert torch.allclose(criterion.weight, torch.tensor(expected, dtype=torch.float32))
    assert criterion.label_smoothing == 0.1
    logits, targets = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    soft = torch.nn.functional.one_hot(targets, 2).float() * 0.7 + 0.15  # mixup-like soft targets work too
    assert torch.isfinite(criterion(logits, targets)) and torch.isfinite(criterion(logits, soft))
    plain = build_criterion(SimpleNamespace(**{**vars(run), "cfg": run.cfg.replace(class_weights=None)}))
    assert plain.weight is None and plain.label_smoothing == 0.1


def test_class_weights_file_in_any_order_with_comments(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("# skewed set\ndog 2.5\n\ncat 0.5  # the common one\n")
    assert read_class_weights(str(path), ["cat", "dog"]) == [0.5, 2.5]
    run, _ = _fake_run(tmp_path, class_weights=str(path.with_name("v.txt")))
    path.with_name("v.txt").write_text("c1 4\nc0 1\n")
    assert build_criterion(run).weight.tolist() == [1.0, 4.0]


@pytest.mark.parametrize("text, message", [
    ("cat 1\n", "no weight for class(es) dog"),
    ("cat 1\ndog 0\n", "line 2: the weight of dog must be a positive number, got 0"),
    ("cat 1\ndog -2\n", "must be a positive number"),
    ("cat 1\ndog nan\n", "must be a positive number"),
    ("cat 1\ndog\n", "line 2: expected `class weight`, got 'dog'"),
    ("cat 1\ndog 1\nfox 1\n", "line 3: no such class in the data: fox"),
    ("cat 1\ncat 2\ndog 1\n", "line 2: a second line for cat"),
])
def test_class_weights_file_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "w.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        read_class_weights(str(path), ["cat", "dog"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_class_weights_file(tmp_path):
    with pytest.raises(UserError, match="^--class-weights .*nope.txt: no such file$"):
        Config(class_weights=str(tmp_path / "nope.txt")).validate()  # refused before the data is read
    Config(class_weights="balanced").validate()
    Config(class_weights="none").validate()
    with pytest.raises(UserError, match="--sampler must be shuffle, balanced"):
        Config(sampler="uniform").validate()
    with pytest.raises(UserError, match="cannot read it"):
        read_class_weights(str(tmp_path / "missing.txt"), ["cat", "dog"])
    with pytest.raises(UserError, match="cannot read it"):
        read_class_weights(str(tmp_path), ["cat", "dog"])  # a folder
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(UserError, match="cannot read it"):
        read_class_weights(str(tmp_path / "bin"), ["cat", "dog"])


# --sampler balanced

TARGETS = [0] * 90 + [1] * 8 + [2] * 2  # 100 samples, 45:4:1


def test_balanced_sampler_draws_each_class_about_equally():
    sampler = BalancedSampler(TARGETS, seed=5)
    per_class = np.zeros(3)
    for epoch in range(10):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == len(TARGETS)  # an epoch: as many draws as the split has samples
        np.add.at(per_class, [TARGETS[i] for i in drawn], 1)
    assert np.all(np.abs(per_class / per_class.sum() - 1 / 3) < 0.05), per_class  # 1000 draws


def test_balanced_sampler_is_deterministic_per_seed_and_epoch():
    a, b = BalancedSampler(TARGETS, seed=5), BalancedSampler(TARGETS, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) == list(a)
    b.set_epoch(4)
    assert list(a) != list(b)
    c = BalancedSampler(TARGETS, seed=6)
    c.set_epoch(3)
    assert list(a) != list(c)


@pytest.mark.parametrize("n", [100, 101])
def test_balanced_sampler_ranks_split_one_global_draw(n):
    targets = (TARGETS + [2])[:n]
    whole = BalancedSampler(targets, seed=2)
    ranks = [BalancedSampler(targets, num_replicas=2, rank=r, seed=2) for r in range(2)]
    for s in (whole, *ranks):
        s.set_epoch(7)
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == -(-n // 2)  # the same batches on every rank
    interleaved = [i for pair in zip(*shares) for i in pair]
    if n % 2 == 0:
        assert interleaved == list(whole)  # rank r has draws r, r+2, ...: together the one-process draw
    else:  # one draw more, to give both ranks equally many
        assert interleaved[:n] == list(whole)
    # with a per-rank batch of 5, batch k of rank 0 and of rank 1 together are the global batch k of 10
    for k in range(len(shares[0]) // 5):
        together = sorted(shares[0][5 * k:5 * k + 5] + shares[1][5 * k:5 * k + 5])
        assert together == sorted(interleaved[10 * k:10 * k + 10])


def test_balanced_sampler_skip_after_set_epoch_continues_exactly():
    sampler = BalancedSampler(TARGETS, num_replicas=2, rank=1, seed=9)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip = 12  # a resume after 3 steps of a per-rank batch of 4 (FolderLoader.set_epoch sets it)
    assert list(sampler) == full[12:]
    sampler.set_epoch(2)  # a new pass starts whole again
    assert sampler.skip == 0 and list(sampler) == full


def test_folder_loader_uses_the_balanced_sampler_and_its_skip(tmp_path):
    run, loaders = _fake_run(tmp_path, counts=(9, 3), sampler="balanced")
    loader = loaders.train
    assert isinstance(loader.sampler, BalancedSampler)
    loader.set_epoch(1)
    whole = [targets.tolist() for _, targets in loader]
    assert len(whole) == len(loader) == 6
    loader.set_epoch(1, start_step=2)  # a resume after 2 steps: the same epoch's batches from the third on
    assert loader.sampler.skip == 4
    assert [targets.tolist() for _, targets in loader] == whole[2:]
    shuffled, _ = _fake_run(tmp_path / "b", counts=(9, 3))
    assert not isinstance(shuffled.train_loader.sampler, BalancedSampler)


def test_balanced_sampler_refuses_a_shard_set_or_dali(tmp_path):
    data = make_image_folder(tmp_path / "data")
    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, local_world_size=1, distributed=False,
                          is_main=True)
    with pytest.raises(UserError, match="^--sampler balanced needs an image folder or a list file$"):
        build_loaders(Config(data_path=data, loader="dali", sampler="balanced"), ctx, need_train=True)
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(UserError, match="^--sampler balanced needs an image folder or a list file$"):
        build_loaders(Config(data_path=str(tmp_path / "index.json"), sampler="balanced"), ctx, need_train=True)


# balanced accuracy

class _Fixed(torch.nn.Module):
    """A fake model: the logits of each batch, in order."""

    def __init__(self, logits):
        super().__init__()
        self.batches = iter(logits)

    def forward(self, images):
        return next(self.batches)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_equals_sklearns(seed):
    g = torch.Generator().manual_seed(seed)
    n, classes = 37, 6
    targets = torch.randint(0, classes - 1, (n,), generator=g)  # the last class never in val
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), targets] += torch.rand(n, generator=g) * 2  # right more often than chance
    batches = [(torch.zeros(len(t), 3, 4, 4, dtype=torch.uint8), t) for t in targets.split(8)]
    ctx = SimpleNamespace(device=torch.device("cpu"), distributed=False,
                          all_reduce=lambda tensor, op="sum": tensor)
    out = loop.evaluate(_Fixed(list(logits.split(8))), batches, ctx, Precision("cpu"), False)
    expected = 100 * balanced_accuracy_score(targets.numpy(), logits.argmax(1).numpy())
    assert out["balanced_acc"] == pytest.approx(expected, abs=1e-9)
    assert out["top1"] == pytest.approx(100 * (logits.argmax(1) == targets).double().mean().item())


def test_class_recall_sums_across_processes_once():
    """Two simulated processes, one without a batch: the sizes are agreed, the tallies added."""
    parts = [loop.ClassRecall(torch.device("cpu")), loop.ClassRecall(torch.device("cpu"))]
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    top = torch.tensor([[0], [1], [1], [2], [0], [2]])
    parts[0].update(torch.zeros(6, 3), targets, top)
    tallies = [parts[0].tally, torch.zeros(2, 3, dtype=torch.float64)]

    def all_reduce(tensor, op="sum"):
        if tensor.numel() == 1:
            return torch.tensor([3.0]) if op == "max" else tensor
        return tallies[0] + tallies[1]

    ctx = SimpleNamespace(distributed=True, all_reduce=all_reduce)
    expected = 100 * balanced_accuracy_score(targets.numpy(), top[:, 0].numpy())
    assert parts[1].result(ctx)["balanced_acc"] == pytest.approx(expected)
    assert parts[0].result(SimpleNamespace(distributed=False))["balanced_acc"] == pytest.approx(expected)


def test_metrics_readers_take_the_new_column(tmp_path):
    assert METRICS_FIELDS.index("balanced_acc") == 12  # appended after the columns of older runs
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 2.0, "top1": 50.0, "top5": 100.0, "lr": 0.1,
           "images_per_sec": 3.0, "epoch_seconds": 4.0, "balanced_acc": 62.5}
    assert " top5 100.000 balanced_acc 62.500 lr " in epoch_line(1, 2, row)
    assert "balanced_acc" not in epoch_line(1, 2, {k: v for k, v in row.items() if k != "balanced_acc"})
    old = tmp_path / "metrics.csv"  # a run begun before the column: still read, no balanced_acc
    old.write_text("epoch,train_loss,val_loss,top1,top5,lr\n1,1,2,50,100,0.1\n")
    assert "balanced_acc" not in report_metrics(str(old))


# the command line

@pytest.mark.slow
def test_cli_balanced_sampler_and_class_weights_write_balanced_acc(tmp_path):
    data = make_skewed_folder(tmp_path / "data", (12, 2), n_val=3)
    out = tmp_path / "out"
    proc = run_cli("train", "--data_path", data, "--output-dir", out, "--epochs", 1, "--sampler", "balanced",
                   "--class-weights", "balanced", "--keep-checkpoints", 1, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "--class-weights balanced: c0 0.5833, c1 3.5" in proc.stdout  # 14 / (2 x 12), 14 / (2 x 2)
    rows = read_metrics(out)
    assert len(rows) == 1 and 0 <= float(rows[0]["balanced_acc"]) <= 100
    assert f"balanced_acc {float(rows[0]['balanced_acc']):.3f}" in proc.stdout
    assert report_metrics(str(out / "metrics.csv"))["balanced_acc"] == [float(rows[0]["balanced_acc"])]
    evaluated = run_cli("eval", "--data_path", data, "--resume", out / "checkpoint.pth.tar", "--output-dir",
                        tmp_path / "ev", "--image-size", 71, "--crop-pct", 1, "--batch-size", 4, "--workers", 0)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"balanced_acc {float(rows[0]['balanced_acc']):.3f}" in evaluated.stdout
