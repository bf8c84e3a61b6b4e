"""The Xception family (model/family.py, model/aligned.py): every arch builds with the published parameter
count (and timm's, when timm is installed), trains, is recognised from its tensors alone, and imports
timm's weights (.safetensors and .pth) with timm's logits. Arch mix-ups are refused in one line.

Kept fast: parameter counts and names come from nets built on the meta device (no memory, no init), and
real nets run at the smallest input: 32 px for the aligned nets (every strided layer pads, so any size
runs; at 32 px the final map is 1x1) and 71 px for the original (its unpadded stem and pools need it).
"""

import pytest
import torch
import torch.nn.functional as F

from xception import create_model
from xception.checkpoint import Checkpoint
from xception.config import MIN_INPUT_SIZE, UserError
from xception.model import ARCH_NAMES, Xception, XceptionAligned
from xception.model.family import ARCHS, arch_of_state_dict, build_arch
from xception.model.weights import Weights, build_model, eval_settings, from_checkpoint, load_into, read_weights

# Trainable parameters with 1000 classes (facts.md, timm's counts; legacy_xception is our "xception").
FACTS = {"xception": 22_855_952, "xception41": 26_969_560, "xception65": 39_916_312,
         "xception71": 42_338_736, "xception41p": 26_907_752, "xception65p": 39_819_560}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets run thousands of small ops; on a busy 2-core machine one intra-op thread was measured
    5-10x faster than two (xception65 step at 32 px: 0.4 s against 2.5-8 s), since no op waits for a
    sibling core that another process holds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smallest_input(arch: str) -> int:
    return MIN_INPUT_SIZE if arch == "xception" else 32


def on_meta(build, arch: str = "aligned"):
    """The net built on the meta device (no memory, no init), except the original: its init draws from a
    normal distribution, which on meta imports torch's compiler (3 s); for real it takes 0.3 s."""
    if arch == "xception":
        return build()
    with torch.device("meta"):
        return build()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_registry_lists_every_arch_with_the_original_first():
    assert ARCH_NAMES[0] == "xception" and set(ARCH_NAMES) == set(FACTS)
    for arch in ARCH_NAMES:
        info = ARCHS[arch]
        assert info.params == FACTS[arch] and info.image_size == 299 and 0.85 < info.crop_pct < 1
        assert info.published.startswith(f"timm {info.timm_name}.")
    assert ARCHS["xception65"].crop_pct == 0.94 and ARCHS["xception41"].crop_pct == 0.903  # ra3 vs tf weights


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_parameter_count_names_and_recognition(arch):
    model = on_meta(lambda: build_arch(arch), arch)
    assert count(model) == FACTS[arch]
    assert isinstance(model, Xception if arch == "xception" else XceptionAligned)
    assert model.keras_exact is False
    # The head rules (weights.HEAD_KEYS, the engine's head-only fine-tuning) look for these top-level names.
    assert {"fc", "dropout", "global_pool"} <= set(dict(model.named_children()))
    state = model.state_dict()
    assert arch_of_state_dict(state) == arch
    assert arch_of_state_dict({"module." + k: v for k, v in state.items()}) == arch  # DDP-saved
    if arch != "xception":
        timm_named = {("head." + k if k.startswith("fc.") else k): v for k, v in state.items()}
        assert arch_of_state_dict(timm_named) == arch
        assert arch_of_state_dict(dict(list(state.items())[:-10])) is None  # truncated: no arch fits
        bent = dict(state, **{"blocks.0.stack.conv1.conv_pw.weight": torch.empty(64, 64, 1, 1, device="meta")})
        assert arch_of_state_dict(bent) is None  # every name right, one shape wrong


def test_parameter_counts_equal_timms():
    timm = pytest.importorskip("timm")
    for arch in ARCH_NAMES:
        ours = on_meta(lambda: build_arch(arch), arch)
        theirs = on_meta(lambda: timm.create_model(ARCHS[arch].timm_name, pretrained=False), arch)
        assert count(ours) == count(theirs) == FACTS[arch], arch


def calibrated(model, size: int):
    """Random BN affine terms, and running statistics that are exactly the mean/variance of a random
    batch (momentum None: a cumulative average), so eval-mode logits are well scaled and a mis-mapped BN
    cannot hide."""
    g = torch.Generator().manual_seed(1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) * 0.2 - 0.1)
            bn.reset_running_stats()
            bn.momentum = None
        model.train()(torch.rand(6, 3, size, size, generator=g) * 2 - 1)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module", params=ARCH_NAMES)
def nets(request, tmp_path_factory):
    """(arch, our net, timm's net, the .pth file): with timm installed, timm's net with calibrated random
    weights, saved as .safetensors and .pth, and ours built from the .safetensors; without timm, ours
    freshly built and no reference. Built once per arch for the tests below (the nets are 23-42M
    parameters)."""
    arch = request.param
    try:
        import timm
        from safetensors.torch import save_file
    except ImportError:
        return arch, build_arch(arch), None, None
    torch.manual_seed(0)
    ref = calibrated(timm.create_model(ARCHS[arch].timm_name, pretrained=False), smallest_input(arch))
    folder = tmp_path_factory.mktemp(arch)
    files = {"safetensors": str(folder / "model.safetensors"), "pth": str(folder / "model.pth")}
    save_file(ref.state_dict(), files["safetensors"])
    torch.save(ref.state_dict(), files["pth"])
    weights, messages = read_weights(files["safetensors"]), []
    assert (weights.arch, weights.fmt) == (arch, "timm")
    model = build_model(weights, log=messages.append, arch=arch).eval()
    assert messages == [f"{files['safetensors']}: timm weights imported"]
    return arch, model, ref, files["pth"]


def test_timm_weights_give_timms_logits(nets):
    arch, model, ref, pth = nets
    if ref is None:
        pytest.skip("timm is not installed")
    assert arch_of_state_dict(ref.state_dict()) == arch
    from_pth = read_weights(pth)  # the .safetensors copy built `model`
    assert (from_pth.arch, from_pth.fmt, from_pth.state.keys()) == (arch, "timm", model.state_dict().keys())
    size = smallest_input(arch)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        features = model.eval().forward_features(x)
        want, got = ref.eval()(x), model.forward_head(features)
    assert features.shape == (2, 2048) + ((3, 3) if arch == "xception" else (1, 1))
    assert want.std() > 0.01  # logits that say something
    assert (got - want).abs().max().item() < 1e-5


def test_one_training_step_changes_the_weights(nets):
    arch, model, _, _ = nets
    size = smallest_input(arch)
    # Batch 2: at 32 px the aligned nets' last BatchNorms see one pixel per image, and need two values.
    x, y = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1, torch.tensor([0, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    first_conv = "entry_flow.0.0.weight" if arch == "xception" else "stem.0.conv.weight"
    bn_mean = next(k for k in after if k.endswith("running_mean"))
    for key in (first_conv, "fc.weight", bn_mean):  # BatchNorm statistics moved too
        assert not torch.equal(before[key], after[key]), key
    model.load_state_dict(before)  # the module's net is shared: leave it as it was
    model.zero_grad(set_to_none=True)


def weights_of(arch: str, source: str = "x65.safetensors", fmt: str = "timm") -> Weights:
    """Weights of `arch` on the meta device: enough for every check before a tensor is copied."""
    state = on_meta(lambda: build_arch(arch)).state_dict()
    return Weights(state, fmt, source, origin={k: k for k in state}, arch=arch)


def test_an_arch_mismatch_is_refused_in_one_line(tmp_path):
    x65 = weights_of("xception65")
    with pytest.raises(UserError) as e:
        build_model(x65, arch="xception41")
    assert str(e.value) == ("--pretrained x65.safetensors holds xception65 weights; pass --arch xception65 "
                            "or other weights")
    with pytest.raises(UserError, match=r"^x65.safetensors holds xception65 weights, not xception; pass --arch "
                                        r"xception65 or other weights$"):
        load_into(on_meta(lambda: Xception(1000), "xception"), x65)  # a caller that built the default net
    original = Xception(5)
    torch.save(original.state_dict(), tmp_path / "original.pth")
    with pytest.raises(UserError, match=r"^\S+original.pth holds xception weights; pass arch='xception' or other"):
        create_model(arch="xception41p", weights=str(tmp_path / "original.pth"))
    assert create_model(weights=str(tmp_path / "original.pth"), log=lambda *a: None).num_classes == 5
    with pytest.raises(UserError, match="^Keras numerics .* only for xception, not xception71$"):
        build_arch("xception71", keras_exact=True)
    with pytest.raises(UserError, match="^unknown arch 'xception99'; choose one of xception, xception41, "):
        create_model(arch="xception99")


def test_aligned_weights_swap_the_head_and_keep_their_arch_through_checkpoints():
    messages = []
    with torch.device("meta"):
        model = build_model(weights_of("xception41p", "mine.pth", "xception"), num_classes=3, log=messages.append)
    assert isinstance(model, XceptionAligned) and model.arch == "xception41p" and model.num_classes == 3
    assert messages == ["mine.pth: loaded all but the classifier (the file's classifier has 1000 classes, "
                        "the model 3); a new 3-class classifier starts from scratch"]
    state = weights_of("xception71").state
    assert from_checkpoint(Checkpoint(model=state, arch="xception71"), "c.pth").arch == "xception71"
    # A writer that left `arch` at its default: the tensors say which net they belong to.
    assert from_checkpoint(Checkpoint(model=state), "c.pth").arch == "xception71"


def test_eval_settings_default_to_the_archs_published_crop():
    quiet = lambda *a: None  # noqa: E731
    assert eval_settings({}, None, None, "w", quiet, arch="xception65p") == (299, 0.94)
    assert eval_settings({}, None, None, "w", quiet, arch="xception71") == (299, 0.903)
    assert eval_settings({}, None, None, "w", quiet) == (299, ARCHS["xception"].crop_pct)
    assert eval_settings({"crop_pct": 0.9}, None, None, "w", quiet, arch="xception41") == (299, 0.9)
