import math

import pytest
import torch
import torch.nn.functional as F

from xception import Xception, create_model
from xception.model.xception import SamePadMaxPool


def test_imagenet_model_has_the_papers_trainable_parameter_count():
    model = Xception(num_classes=1000)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 22_855_952


def test_layout_follows_entry_middle_and_exit_flow():
    model = Xception(num_classes=10)
    assert len(model.middle_flow) == 8
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        model.eval()
        entry = model.entry_flow(x)
        exit_ = model.exit_flow(model.middle_flow(entry))
    assert entry.shape == (1, 728, 19, 19)
    assert exit_.shape == (1, 2048, 10, 10)


@pytest.mark.parametrize("num_classes,size", [(7, (71, 71)), (3, (71, 100)), (1, (96, 80))])
def test_any_class_count_and_input_of_at_least_71_pixels(num_classes, size):
    model = Xception(num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, num_classes)


def test_input_below_71_pixels_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 71"):
        Xception(num_classes=2)(torch.randn(1, 3, 70, 90))


def test_init_batchnorm_at_identity_and_first_loss_near_ln_classes():
    torch.manual_seed(0)
    model = Xception(num_classes=10)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # no zero-initialised residual gammas (they cost accuracy)
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    with torch.no_grad():
        loss = F.cross_entropy(model(torch.randn(8, 3, 71, 71)), torch.arange(8))
    assert abs(loss.item() - math.log(10)) < 0.2


def test_every_parameter_gets_a_gradient():
    model = Xception(num_classes=4)
    loss = F.cross_entropy(model(torch.randn(2, 3, 71, 71)), torch.tensor([0, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_acts_in_training_and_not_in_eval():
    torch.manual_seed(0)
    model = Xception(num_classes=5, drop_rate=0.5)
    features = torch.randn(4, 2048, 3, 3)
    model.train()
    a, b = model.forward_head(features), model.forward_head(features)
    assert not torch.allclose(a, b), "dropout did nothing in train mode"
    model.eval()
    assert torch.equal(model.forward_head(features), model.forward_head(features))
    no_drop = Xception(num_classes=5, drop_rate=0.0).train()
    assert torch.equal(no_drop.forward_head(features), no_drop.forward_head(features))


def test_same_pad_max_pool_pads_after_like_tensorflow():
    # On a 4x4 map TF "same" pads 0 before and 1 after: the windows start at 0 and 2.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = SamePadMaxPool()(x)
    assert out.shape == (1, 1, 2, 2)
    assert out.flatten().tolist() == [10.0, 11.0, 14.0, 15.0]
    # PyTorch's padding=1 pads both sides and sees different windows.
    assert F.max_pool2d(x, 3, 2, 1).flatten().tolist() == [5.0, 7.0, 13.0, 15.0]


def test_keras_exact_uses_keras_batchnorm_epsilon():
    bns = [m for m in Xception(num_classes=2, keras_exact=True).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)


def test_create_model_loads_all_but_a_classifier_of_another_size(tmp_path):
    source = Xception(num_classes=5)
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    messages = []
    model = create_model(num_classes=3, weights=str(path), log=messages.append)
    assert model.fc.out_features == 3
    assert torch.equal(model.entry_flow[0][0].weight, source.entry_flow[0][0].weight)
    assert any("classifier" in m for m in messages)
    same = create_model(num_classes=5, weights=str(path), log=messages.append)
    assert torch.equal(same.fc.weight, source.fc.weight)
