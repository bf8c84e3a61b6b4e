"""Weight import from every supported format, written by the real libraries, and fine-tuning mechanics.

Foreign files are made here at run time: timm's legacy_xception (pretrained=False) saved with torch.save
and with safetensors, the same renamed the Cadene way (last_linear), a Keras 3 legacy .h5 written by
Keras itself (keras.applications.Xception on Keras's torch backend), and a Keras 2 style file (the
author's published layout, weight names ending in ':0') written with h5py.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before any keras import: Keras 3 on PyTorch, no TF needed

import h5py
import numpy as np
import pytest
import torch

from xception import Xception, create_model
from xception.config import UserError
from xception.engine.hooks import HeadOnly
from xception.model.ports import DOWN_BLOCKS
from xception.model.weights import read_weights

SIZE = 71
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")  # keras on numpy 2, only keras


def randomise_bn(model, seed=0):
    """Non-trivial BN statistics and affine terms, so a mis-mapped BN cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = randomise_bn(timm.create_model("legacy_xception", pretrained=False)).eval()
    with torch.no_grad():
        ref.fc.weight.mul_(50)  # well separated logits: a wrong mapping changes the ranking
    folder = tmp_path_factory.mktemp("timm")
    state = ref.state_dict()
    paths = {"timm_pth": folder / "legacy_xception.pth", "safetensors": folder / "model.safetensors",
             "cadene_pth": folder / "xception-cadene.pth"}
    torch.save(state, paths["timm_pth"])
    save_file(state, str(paths["safetensors"]))
    torch.save({("last_linear." + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()},
               paths["cadene_pth"])
    return ref, {k: str(v) for k, v in paths.items()}


def test_parameter_count_matches_timm(timm_files):  # the paper's figure: test_model.py
    ref, _ = timm_files
    ours = sum(p.numel() for p in Xception(1000).parameters())
    assert ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("kind,fmt", [("timm_pth", "timm"), ("safetensors", "timm"), ("cadene_pth", "cadene")])
def test_timm_and_cadene_files_give_timms_logits(timm_files, kind, fmt):
    ref, paths = timm_files
    messages = []
    model = create_model(weights=paths[kind], log=messages.append).eval()
    assert read_weights(paths[kind]).fmt == fmt
    assert model.num_classes == 1000 and not model.keras_exact
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff < 1e-4, diff
    assert not any("classifier" in m for m in messages)


def test_head_swap_for_a_foreign_file_keeps_the_backbone(timm_files):
    ref, paths = timm_files
    messages = []
    model = create_model(num_classes=3, weights=paths["cadene_pth"], log=messages.append)
    assert model.fc.out_features == 3
    assert torch.equal(model.entry_flow[0][0].weight, ref.conv1.weight)
    assert torch.equal(model.exit_flow[2][1].running_var, ref.bn4.running_var)
    assert any("loaded all but the classifier" in m and "3-class" in m for m in messages)


def test_missing_and_misshapen_tensors_are_named(timm_files, tmp_path):
    _, paths = timm_files
    state = torch.load(paths["timm_pth"], weights_only=True)
    gone = dict(state)
    del gone["block3.rep.4.pointwise.weight"]
    torch.save(gone, tmp_path / "gone.pth")
    with pytest.raises(UserError, match=r"missing tensor block3\.rep\.4\.pointwise\.weight"):
        create_model(weights=str(tmp_path / "gone.pth"), log=lambda *a: None)
    bent = dict(state)
    bent["block7.rep.2.running_mean"] = torch.zeros(5)
    torch.save(bent, tmp_path / "bent.pth")
    with pytest.raises(UserError, match=r"tensor block7\.rep\.2\.running_mean has shape \(5,\)"):
        create_model(weights=str(tmp_path / "bent.pth"), log=lambda *a: None)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown weights format"):
        create_model(weights=str(tmp_path / "notes.txt"))
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="neither ours nor timm"):
        create_model(weights=str(tmp_path / "other.pth"))


# --- Keras ---------------------------------------------------------------------------------------------

KERAS_SIZE = 75  # 75 px gives an 18x18 map before a max-pool: TF "same" padding differs from PyTorch's there


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    keras = pytest.importorskip("keras", reason="keras 3 (test-only dependency) is not installed")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()}; these tests need KERAS_BACKEND=torch")
    keras.utils.set_random_seed(0)
    model = keras.applications.Xception(weights=None, input_shape=(KERAS_SIZE, KERAS_SIZE, 3),
                                        classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-trivial BN statistics, as in trained weights
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.1, 0.1, n),
                               rng.uniform(-0.1, 0.1, n), rng.uniform(0.5, 1.5, n)])
    path = tmp_path_factory.mktemp("keras") / "xception_keras3.h5"
    model.save(str(path))  # Keras's legacy HDF5 format: names like block1_conv1/kernel, conv2d_1/kernel
    x = rng.uniform(-1, 1, (2, KERAS_SIZE, KERAS_SIZE, 3)).astype("float32")
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    return str(path), x, np.asarray(logits)


def test_keras3_h5_matches_keras_logits(keras_file):
    path, x, ref = keras_file
    messages = []
    model = create_model(weights=path, log=messages.append).eval()
    assert model.keras_exact  # chosen automatically for Keras weights
    with torch.no_grad():
        ours = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        plain = create_model(weights=path, keras_exact=False, log=lambda *a: None).eval()
        off = plain(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    # Relative to the logits' size (max|logit| ~0.24 here): Keras's kernels and ours agree to rounding (~1e-6
    # of it, which varies by CPU), while PyTorch numerics are off by ~4e-4 of it, a fixed amount (eps, padding)
    # that the bar below must sit well under
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    assert diff < 5e-5 * scale, (diff, scale)
    assert np.abs(off - ref).max() > 4 * 5e-5 * scale  # PyTorch numerics would not match: the test can fail
    assert any("Keras numerics" in m for m in messages)


def test_keras_notop_file_loads_the_backbone_and_a_new_head(keras_file, tmp_path):
    path, x, _ = keras_file
    notop = tmp_path / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "r") as src, h5py.File(notop, "w") as dst:  # the published _notop layout
        g = src["model_weights"]
        names = [n for n in g.attrs["layer_names"] if (n.decode() if isinstance(n, bytes) else n) != "predictions"]
        for n in names:
            g.copy(n, dst)
        dst.attrs["layer_names"] = names
    full = create_model(weights=path, log=lambda *a: None).eval()
    messages = []
    model = create_model(num_classes=5, weights=str(notop), log=messages.append).eval()
    assert model.fc.out_features == 5 and model.keras_exact
    assert any("no classifier" in m for m in messages)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(t), full.forward_features(t), atol=1e-5)


def write_keras2_h5(model, path, residual_names=("conv2d_4", "conv2d_5", "conv2d_6", "conv2d_7")):
    """The author's Keras 2 weights-only layout, written with h5py from one of our models: root attribute
    layer_names in network order, each layer a group whose weight_names end in ':0', kernels in TF layout."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layers = []

    def conv(name, key):
        layers.append((name, [("kernel", sd[key].transpose(2, 3, 1, 0))]))

    def sep(name, prefix):
        layers.append((name, [("depthwise_kernel", sd[prefix + ".depthwise.weight"].transpose(2, 3, 0, 1)),
                              ("pointwise_kernel", sd[prefix + ".pointwise.weight"].transpose(2, 3, 1, 0))]))

    def bn(name, prefix):
        layers.append((name, [(a, sd[f"{prefix}.{b}"]) for a, b in
                              (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                               ("moving_variance", "running_var"))]))

    conv("block1_conv1", "entry_flow.0.0.weight"), bn("block1_conv1_bn", "entry_flow.0.1")
    conv("block1_conv2", "entry_flow.1.0.weight"), bn("block1_conv2_bn", "entry_flow.1.1")
    for i, block in enumerate(DOWN_BLOCKS):
        kb = (2, 3, 4, 13)[i]
        # Keras lists the unnamed residual conv/BN between the block's layers; only their order counts.
        sep(f"block{kb}_sepconv1", f"{block}.sep1.conv"), bn(f"block{kb}_sepconv1_bn", f"{block}.sep1.bn")
        conv(residual_names[i], f"{block}.shortcut.0.weight")
        sep(f"block{kb}_sepconv2", f"{block}.sep2.conv"), bn(f"block{kb}_sepconv2_bn", f"{block}.sep2.bn")
        bn(f"batch_normalization_{i + 4}", f"{block}.shortcut.1")
        if kb == 4:
            for mb in range(8):
                for u in range(3):
                    sep(f"block{mb + 5}_sepconv{u + 1}", f"middle_flow.{mb}.body.{u}.conv")
                    bn(f"block{mb + 5}_sepconv{u + 1}_bn", f"middle_flow.{mb}.body.{u}.bn")
    sep("block14_sepconv1", "exit_flow.1.0"), bn("block14_sepconv1_bn", "exit_flow.1.1")
    sep("block14_sepconv2", "exit_flow.2.0"), bn("block14_sepconv2_bn", "exit_flow.2.1")
    layers.append(("predictions", [("kernel", sd["fc.weight"].T), ("bias", sd["fc.bias"])]))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n, _ in layers]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.1.0"
        for name, weights in layers:
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"{name}/{a}:0".encode() for a, _ in weights]
            for a, value in weights:
                g.create_dataset(f"{name}/{a}:0", data=value)
    return [n for n, _ in layers]


def test_keras2_layout_written_with_h5py_imports_exactly(tmp_path):
    torch.manual_seed(3)
    source = randomise_bn(Xception(num_classes=7, keras_exact=True), seed=3).eval()
    path = tmp_path / "xception_weights_tf_dim_ordering_tf_kernels.h5"
    write_keras2_h5(source, path)
    imported = read_weights(str(path))
    assert imported.fmt == "keras" and imported.keras_exact
    model = create_model(weights=str(path), log=lambda *a: None).eval()
    assert model.keras_exact and model.num_classes == 7
    x = torch.rand(2, 3, KERAS_SIZE, KERAS_SIZE) * 2 - 1
    with torch.no_grad():
        assert (model(x) - source(x)).abs().max().item() < 1e-5


def test_keras_file_with_a_missing_or_misshapen_layer_is_named(tmp_path):
    source = Xception(num_classes=4, keras_exact=True)
    path = tmp_path / "k.h5"
    write_keras2_h5(source, path)
    with h5py.File(path, "a") as f:
        names = [n for n in f.attrs["layer_names"]
                 if (n.decode() if isinstance(n, bytes) else n) != "block9_sepconv2_bn"]
        assert len(names) == len(f.attrs["layer_names"]) - 1
        f.attrs["layer_names"] = names
    with pytest.raises(UserError, match="missing tensor block9_sepconv2_bn/gamma"):
        create_model(weights=str(path), log=lambda *a: None)
    write_keras2_h5(source, path)
    with h5py.File(path, "a") as f:
        del f["block5_sepconv1/block5_sepconv1/depthwise_kernel:0"]
        f["block5_sepconv1"].create_dataset("block5_sepconv1/depthwise_kernel:0", data=np.zeros((3, 3, 5, 1)))
    with pytest.raises(UserError, match=r"tensor block5_sepconv1/depthwise_kernel has shape \(5, 1, 3, 3\)"):
        create_model(weights=str(path), log=lambda *a: None)


# --- fine-tuning mechanics ------------------------------------------------------------------------------

def test_head_only_freezes_backbone_and_bn_statistics_then_releases():
    torch.manual_seed(0)
    model = Xception(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    freezer = HeadOnly(model, optimizer, epochs=1, log=lambda *a: None)
    x, y = torch.rand(4, 3, SIZE, SIZE) * 2 - 1, torch.tensor([0, 1, 2, 0])

    def step():
        model.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    freezer.epoch_start(0)
    step()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(changed) == {"fc.weight", "fc.bias"}, changed  # running stats and counters untouched too
    freezer.epoch_start(1)
    assert not freezer.active
    step()
    assert not torch.equal(before["entry_flow.0.0.weight"], model.entry_flow[0][0].weight)
    assert not torch.equal(before["entry_flow.0.1.running_mean"], model.entry_flow[0][1].running_mean)
