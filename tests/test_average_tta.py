"""Weight averaging (`xception average`), the EMA weights downstream (eval, predict and export take a
weights that the checkpoint's run ranked higher, its `best_source`, unless --raw-weights or --ema-weights) and
`--tta flip`. Checkpoints are built here from a real Xception
state dict, so nothing needs training."""

import dataclasses
import json

import pytest
import torch

from conftest import make_image_folder, one_line_error, run_cli
from xception.checkpoint import Checkpoint
from xception.config import UserError
from xception.engine.evaluate import FlipTTA
from xception.model import Xception
from xception.model.weights import from_checkpoint, read_weights
from xception.tools import average, export

CLASSES = ["cat", "dog", "fox"]  # make_image_folder's classes
SETTINGS = {"image_size": 71, "crop_pct": 1.0}  # the model's minimum input, so that CLI runs are quick


def state_of(seed: int) -> dict:
    torch.manual_seed(seed)
    net = Xception(num_classes=3)
    with torch.no_grad():  # BatchNorm buffers that differ between seeds too, so that they are averaged
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(seed * 10)
    return net.state_dict()


def save(path, state, classes=CLASSES, **kw):
    Checkpoint(model=state, class_names=list(classes), args=dict(SETTINGS), **kw).save(str(path))
    return str(path)


def quiet(*_):
    pass


def test_average_of_two_is_their_elementwise_mean(tmp_path):
    a, b = state_of(1), state_of(2)
    out = tmp_path / "mean.pth.tar"
    average.average([save(tmp_path / "a", a, epoch=3), save(tmp_path / "b", b, epoch=5)], str(out), log=quiet)
    got = Checkpoint.load(str(out))
    assert got.class_names == CLASSES and got.epoch == 5 and not got.resumable and got.ema is None
    assert got.args == SETTINGS
    for key, value in a.items():
        if value.is_floating_point():
            want = ((value.double() + b[key].double()) / 2).float()
            assert got.model[key].dtype == value.dtype and torch.equal(got.model[key], want), key
        else:  # counters: the larger, not a mean
            assert torch.equal(got.model[key], torch.maximum(value, b[key])), key
    assert not torch.equal(got.model["fc.weight"], a["fc.weight"])  # the two inputs did differ


def test_average_of_one_is_the_input_bitwise(tmp_path):
    a = state_of(3)
    out = tmp_path / "one.pth.tar"
    average.average([save(tmp_path / "a", a, epoch=7)], str(out), log=quiet)
    got = Checkpoint.load(str(out))
    assert got.model.keys() == a.keys()
    assert all(torch.equal(got.model[k], v) and got.model[k].dtype == v.dtype for k, v in a.items())
    assert got.epoch == 7
    w = read_weights(str(out), choice="best")  # loadable by eval/predict/export as a plain checkpoint
    assert w.variant is None and w.choice_note is None


def test_average_takes_each_inputs_best_weights_unless_told(tmp_path):
    a, b = state_of(1), state_of(2)
    mean_ab = ((a["fc.weight"].double() + b["fc.weight"].double()) / 2).float()
    # its EMA is b's weights and scored best: the average of a's EMA and b is b
    a_path = save(tmp_path / "a", a, ema=b, best_source="ema")
    lines = []
    average.average([a_path, save(tmp_path / "b", b)], str(tmp_path / "ema"), log=lines.append)
    assert any(f"using the EMA weights of {a_path}: they scored higher" in line for line in lines)
    got = Checkpoint.load(str(tmp_path / "ema")).model
    assert torch.equal(got["fc.weight"], b["fc.weight"])
    average.average([a_path, save(tmp_path / "b2", b)], str(tmp_path / "raw"), choice="model", log=quiet)
    raw = Checkpoint.load(str(tmp_path / "raw")).model
    assert torch.equal(raw["fc.weight"], mean_ab)
    # a run whose trained weights scored best: those by default, the EMA when asked
    m_path = save(tmp_path / "m", a, ema=b, best_source="model")
    average.average([m_path, save(tmp_path / "b3", b)], str(tmp_path / "best"), log=quiet)
    assert torch.equal(Checkpoint.load(str(tmp_path / "best")).model["fc.weight"], mean_ab)
    average.average([m_path, save(tmp_path / "b4", b)], str(tmp_path / "forced"), choice="ema", log=quiet)
    assert torch.equal(Checkpoint.load(str(tmp_path / "forced")).model["fc.weight"], b["fc.weight"])


def test_average_refuses_other_networks_and_missing_files(tmp_path):
    a = state_of(1)
    first = save(tmp_path / "a", a)
    bent = dict(a, **{"fc.weight": a["fc.weight"][:, :10]})
    with pytest.raises(UserError, match="different shapes: tensor fc.weight"):
        average.average([first, save(tmp_path / "bent", bent)], str(tmp_path / "o1"), log=quiet)
    short = {k: v for k, v in a.items() if k != "fc.bias"}
    with pytest.raises(UserError, match="different tensors: .* lacks tensor fc.bias"):
        average.average([first, save(tmp_path / "short", short)], str(tmp_path / "o2"), log=quiet)
    with pytest.raises(UserError, match="no such file"):
        average.average([first, str(tmp_path / "missing")], str(tmp_path / "o3"), log=quiet)
    with pytest.raises(UserError, match="at least one"):
        average.average([], str(tmp_path / "o4"), log=quiet)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


@pytest.mark.slow
def test_average_cli_refuses_other_class_lists_and_an_existing_out(tmp_path):
    a = save(tmp_path / "a.pth.tar", state_of(1))
    b = save(tmp_path / "b.pth.tar", state_of(2), classes=["cat", "dog", "owl"])
    proc = run_cli("average", a, b, "-o", tmp_path / "out.pth.tar")
    assert proc.returncode == 2
    assert "average of checkpoints with different class lists" in one_line_error(proc)
    assert not (tmp_path / "out.pth.tar").exists()
    before = (tmp_path / "a.pth.tar").read_bytes()
    for out in (tmp_path / "a.pth.tar", tmp_path / "taken"):  # an input, or any other existing file
        if out.name == "taken":
            out.write_text("a user's file")
        proc = run_cli("average", a, "--out", out)
        assert proc.returncode == 2 and "already exists" in one_line_error(proc)
    assert (tmp_path / "a.pth.tar").read_bytes() == before and (tmp_path / "taken").read_text() == "a user's file"
    proc = run_cli("average", a, a, "-o", tmp_path / "twice.pth.tar")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "mean of 2 checkpoint(s)" in proc.stdout


def test_flip_tta_averages_the_image_and_its_mirror():
    torch.manual_seed(0)
    net = Xception(num_classes=3).eval()
    tta = FlipTTA(net).eval()
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        plain, mirrored = net(x), net(x.flip(-1))
        assert torch.equal(tta(x), (plain + mirrored) / 2)
        assert not torch.allclose(plain, mirrored)  # the mirror did change something
        symmetric = x + x.flip(-1)  # its own mirror: TTA changes nothing
        assert torch.equal(symmetric, symmetric.flip(-1))
        assert torch.allclose(tta(symmetric), net(symmetric), rtol=0, atol=1e-6)


# A checkpoint whose trained weights and EMA give recognisably different logits: the trained classifier is
# all zeros (uniform probabilities, eval loss ln 3), the EMA's has bias 100 for "cat" (eval loss 200/3). Its
# run ranked the EMA higher (best_source "ema"), so the EMA is what eval/predict/export take by default.

@pytest.fixture(scope="module")
def two_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ema")
    model = state_of(4)
    model["fc.weight"] = torch.zeros_like(model["fc.weight"])
    model["fc.bias"] = torch.zeros_like(model["fc.bias"])
    ema = {k: v.clone() for k, v in model.items()}
    ema["fc.bias"] = torch.tensor([100.0, 0.0, 0.0])
    return (save(folder / "ema.pth.tar", model, ema=ema, ema_updates=5, best_source="ema"),
            save(folder / "plain.pth.tar", model))


def test_the_weight_loader_takes_the_runs_choice_or_the_one_asked_for(two_weights):
    with_ema, plain = two_weights
    ckpt = Checkpoint.load(with_ema)
    assert from_checkpoint(ckpt, with_ema).variant == "model"  # the default, which resuming relies on
    best = read_weights(with_ema, choice="best")
    assert best.variant == "ema" and best.state["fc.bias"][0] == 100
    assert best.choice_note == (f"using the EMA weights of {with_ema}: they scored higher than the trained ones "
                                f"in the run's evaluation (--raw-weights for the trained ones)")
    assert "(--raw-weights), not the EMA" in read_weights(with_ema, choice="model").choice_note
    assert "(--ema-weights)" in read_weights(with_ema, choice="ema").choice_note
    model_best = from_checkpoint(dataclasses.replace(ckpt, best_source="model"), with_ema, "best")
    assert model_best.variant == "model" and model_best.state["fc.bias"][0] == 0
    assert "(--ema-weights for the EMA)" in model_best.choice_note
    assert read_weights(plain, choice="best").choice_note is None  # nothing to choose: no line


@pytest.mark.slow
def test_export_follows_the_ema_and_raw_weights(two_weights, tmp_path):
    with_ema, _ = two_weights
    from xception.model.deploy import load_torchscript
    for choice, bias0 in (("best", 100.0), ("model", 0.0)):
        lines = []
        path = tmp_path / f"{choice}.pt"
        export.export(with_ema, "torchscript", str(path), log=lines.append, choice=choice)
        assert ("using the EMA weights" in lines[0]) == (choice == "best"), lines
        graph, _ = load_torchscript(str(path))
        with torch.no_grad():
            logits = graph(torch.zeros(1, 3, 71, 71))
        assert abs(logits[0, 0].item() - bias0) < 1e-3 and logits[0, 1:].abs().max() < 1e-3


@pytest.mark.slow
def test_predict_follows_the_ema_and_says_so(two_weights, tmp_path):
    with_ema, plain = two_weights
    data = make_image_folder(tmp_path / "data", n_train=1, n_val=1)
    image = f"{data}/val/dog/0.jpg"
    proc = run_cli("predict", image, "--weights", with_ema, "--json", "--topk", 1)
    assert proc.returncode == 0, proc.stderr
    top = json.loads(proc.stdout)["predictions"][0]["top"][0]  # stdout is the JSON alone
    assert top["class"] == "cat" and top["probability"] == 1.0
    assert f"using the EMA weights of {with_ema}: they scored higher" in proc.stderr
    raw = run_cli("predict", image, "--weights", with_ema, "--json", "--raw-weights")
    assert raw.returncode == 0, raw.stderr
    uniform = json.loads(raw.stdout)["predictions"][0]["top"]
    assert all(t["probability"] == pytest.approx(1 / 3, abs=1e-5) for t in uniform)
    assert "using the EMA" not in raw.stderr
    plain_run = run_cli("predict", image, "--weights", plain, "--json")
    assert plain_run.returncode == 0 and "using the" not in plain_run.stderr


@pytest.mark.slow
def test_eval_follows_the_ema_raw_weights_and_tta(two_weights, tmp_path):
    with_ema, _ = two_weights
    data = make_image_folder(tmp_path / "data", n_train=1, n_val=3)

    def evaluate(*flags):
        proc = run_cli("eval", "--data_path", data, "--weights", with_ema, "--workers", 0, "--batch-size", 9,
                       "--output-dir", tmp_path / "out", "--no-check-data", *flags)
        assert proc.returncode == 0, proc.stderr
        line = next(line for line in proc.stdout.splitlines() if " images: loss " in line)
        return proc.stdout, line, float(line.split("loss ")[1].split()[0])

    out, line, loss = evaluate()
    assert f"using the EMA weights of {with_ema}" in out and "(EMA weights)" in line
    assert loss == pytest.approx(200 / 3, abs=1e-3)  # the EMA's logits, not the trained ones'
    out, line, loss = evaluate("--raw-weights")
    assert "(trained weights)" in line and loss == pytest.approx(1.0986, abs=1e-3)  # ln 3: uniform
    _, line, loss = evaluate("--tta", "flip")
    assert "(EMA weights, tta flip)" in line and loss == pytest.approx(200 / 3, abs=1e-3)
