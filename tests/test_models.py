"""Networks (docs/method.md): check figures, structure, registry, forward/backward of every model,
BatchNorm over parts of a batch against the two-GPU DataParallel step it stands for."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iterand_tune.config import TrialConfig
from iterand_tune.models import (Conv6, ResNet, SplitBatchNorm2d, count_parameters, create_model,
                                 estimate_macs, is_known_model, model_names)
from iterand_tune.supermask import SparseConv2d, SparseLinear, sparse_layers


def pruned_cfg(model="conv6x1.0", p=0.5, **kw):
    return TrialConfig(model=model, train_mode="score_only", conv_sparsity=p, bn_affine=False, **kw)


def test_check_figures_of_the_method():
    conv6 = create_model("conv6x1.0", pruned_cfg())
    assert count_parameters(conv6)["params_before_pruning"] == 2_262_602
    r18 = create_model("resnet18x1.0", pruned_cfg("resnet18x1.0", 0.6))
    assert count_parameters(r18)["params_before_pruning"] == 11_164_362


def test_params_after_pruning_subtracts_int_numel_p_per_score_tensor():
    m = create_model("conv6x0.5", pruned_cfg("conv6x0.5", 0.6, linear_sparsity=0.3))
    counts = count_parameters(m)
    layers = list(sparse_layers(m))
    assert len(layers) == 9
    expected = counts["params_before_pruning"] - sum(
        int(l.scores.numel() * l.sparsity) for l in layers)
    assert counts["params_after_pruning"] == expected
    assert [l.sparsity for l in layers] == [0.6] * 8 + [0.3]  # linear_sparsity: last layer only


def test_sgd_models_are_dense_and_count_bn_affine():
    m = create_model("resnet18x1.0", TrialConfig(model="resnet18x1.0"))
    assert not any(isinstance(p, torch.Tensor) and n.endswith("scores") for n, p in m.named_parameters())
    c = count_parameters(m)
    assert c["params_before_pruning"] == c["params_after_pruning"] == 11_173_962  # + BN affine


def test_conv6_structure_and_width_truncation():
    m = create_model("conv6x0.25", pruned_cfg("conv6x0.25"))
    convs = [l for l in m.modules() if isinstance(l, SparseConv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert all(c.bias is not None and c.kernel_size == (3, 3) for c in convs)
    fcs = [l for l in m.modules() if isinstance(l, SparseLinear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(64 * 16, 64), (64, 64), (64, 10)]
    assert not any(isinstance(l, nn.BatchNorm2d) for l in m.modules())
    odd = create_model("conv6x0.3")  # int() truncation: 19.2 -> 19
    assert odd.features[0].out_channels == 19


@pytest.mark.parametrize("width", [0.25, 0.5, 2.0])
def test_resnet_stem_has_64_channels_whatever_the_width(width):
    m = create_model(f"resnet18x{width}", pruned_cfg(f"resnet18x{width}"))
    assert m.stem[0].out_channels == 64 and m.stem[0].kernel_size == (3, 3)
    assert m.layer1[0].conv1.in_channels == 64
    assert [m.layer1[0].conv1.out_channels, m.layer4[0].conv1.out_channels] == [int(64 * width),
                                                                                 int(512 * width)]
    assert m.fc.in_features == int(512 * width)


def test_bottleneck_and_shortcuts():
    m = create_model("resnet50", pruned_cfg("resnet50"))
    assert m.fc.in_features == 2048
    block = m.layer1[0]
    assert [block.conv1.kernel_size, block.conv2.kernel_size, block.conv3.kernel_size] == [(1, 1), (3, 3), (1, 1)]
    assert isinstance(block.shortcut, nn.Sequential)  # 64 -> 256 channels
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)
    r18 = create_model("resnet18", pruned_cfg("resnet18"))
    assert isinstance(r18.layer1[0].shortcut, nn.Identity)
    assert r18.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert sum(1 for _ in sparse_layers(r18)) == 1 + 16 + 3 + 1  # stem, block convs, shortcuts, fc


def test_imagenet_variant_stem():
    m = create_model("resnet18", pruned_cfg("resnet18", dataset="imagenet"), num_classes=1000,
                     image_size=224)
    assert m.stem[0].kernel_size == (7, 7) and m.stem[0].stride == (2, 2) and m.stem[0].padding == (3, 3)
    assert isinstance(m.stem[3], nn.MaxPool2d)
    out = m(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_bn_affine_and_momentum_follow_config():
    m = create_model("resnet18x0.25", pruned_cfg("resnet18x0.25", bn_momentum=0.2))
    bns = [l for l in m.modules() if isinstance(l, nn.BatchNorm2d)]
    assert all(b.weight is None and b.momentum == 0.2 and b.track_running_stats for b in bns)
    m2 = create_model("resnet18x0.25", TrialConfig(model="resnet18x0.25"))
    assert all(b.weight is not None for b in m2.modules() if isinstance(b, nn.BatchNorm2d))


def test_init_mode_linear_only_changes_the_last_layer():
    m = create_model("conv6x0.25", pruned_cfg("conv6x0.25", init_mode="signed_constant",
                                              init_mode_linear="kaiming_normal"))
    layers = list(sparse_layers(m))
    assert [l.init_mode for l in layers] == ["signed_constant"] * 8 + ["kaiming_normal"]
    first = layers[0].weight
    assert torch.allclose(first.abs(), first.abs().max().expand_as(first))


def test_registry_lists_every_paper_name():
    names = set(model_names())
    for family in ("conv6", "resnet18", "resnet34"):
        for w in ("0.25", "0.5", "1.0", "2.0"):
            assert f"{family}x{w}" in names
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= names
    assert is_known_model("resnet34x0.75") and not is_known_model("resnet34x0")
    assert not is_known_model("vgg16") and not is_known_model("resnet50x")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("conv7x1.0")


SMALL = [n for n in model_names() if not n.endswith("x2.0") and n not in ("resnet50", "resnet101")]
LARGE = [n for n in model_names() if n not in SMALL]


def _forward_backward(name):
    torch.manual_seed(0)
    m = create_model(name, pruned_cfg(name))
    for pname, p in m.named_parameters():
        p.requires_grad_(pname.endswith("scores"))
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for layer in sparse_layers(m):
        assert layer.scores.grad is not None and torch.isfinite(layer.scores.grad).all()
        assert layer.weight.grad is None


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_every_registered_model(name):
    _forward_backward(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_forward_backward_large_models(name):
    _forward_backward(name)


def test_model_classes_are_plain_modules():
    assert isinstance(create_model("conv6x0.25"), Conv6)
    assert isinstance(create_model("resnet34x0.25"), ResNet)


def test_estimate_macs_conv6_by_hand():
    convs = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256),
             (8, 256, 256)]  # (spatial size, C_in, C_out), 3x3 kernels, padding 1
    linear = 256 * 4 * 4 * 256 + 256 * 256 + 256 * 10
    by_hand = sum(h * h * cin * cout * 9 for h, cin, cout in convs) + linear
    assert by_hand == 153_881_088
    assert estimate_macs("conv6x1.0") == by_hand


# ----------------------------------------------------------------------------- BatchNorm over parts


def _replicas_step(module, x, y):
    """What nn.DataParallel(module, device_ids=[0, 1]) computes in one training step, on one CPU:
    the batch scattered as x.chunk(2); replica 0 is the module itself (on the first GPU its
    buffers are the module's), replica 1 a copy made before the forward (its buffer updates are
    thrown away); the outputs gathered and one mean loss over the whole batch; each parameter's
    gradient the sum of the replicas' (Broadcast's backward is a reduce-add)."""
    parts = x.chunk(2)
    copy_1 = copy.deepcopy(module)
    out = torch.cat([module(parts[0]), copy_1(parts[1])])
    loss = F.cross_entropy(out, y)
    loss.backward()
    for p, p1 in zip(module.parameters(), copy_1.parameters()):
        if p1.grad is not None:
            p.grad = p.grad + p1.grad
    return out, loss


def _twin_models(cfg, dtype=torch.float32):
    torch.manual_seed(0)
    split = create_model(cfg.model, cfg.replace(bn_splits=2)).to(dtype)
    torch.manual_seed(0)
    plain = create_model(cfg.model, cfg).to(dtype)
    assert all(torch.equal(a, b) for a, b in zip(split.state_dict().values(), plain.state_dict().values()))
    for m in (split, plain):
        for name, p in m.named_parameters():
            p.requires_grad_(name.endswith("scores") if cfg.train_mode == "score_only" else True)
    return split, plain


def _close(got, want, what):
    # float64: the two computations are the same arithmetic up to the order of a few sums.
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("cfg", [
    pruned_cfg("resnet18x0.125", 0.6, init_mode="signed_constant"),  # edge-popup: scores only
    TrialConfig(model="resnet18x0.125", bn_momentum=0.3),            # SGD: weights and BN affine
], ids=["edgepopup", "sgd"])
@pytest.mark.parametrize("batch", [8, 7])  # 7: parts of 4 and 3, as DataParallel scatters them
def test_split_batchnorm_is_the_two_gpu_data_parallel_step(cfg, batch):
    split, plain = _twin_models(cfg, torch.float64)
    gen = torch.Generator().manual_seed(1)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                            weight_decay=5e-4) for m in (split, plain)]
    for step in range(2):  # the second step starts from what the first left: weights, buffers
        x = torch.randn(batch, 3, 32, 32, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (batch,), generator=gen)
        split.train(), plain.train()
        out = split(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        ref_out, ref_loss = _replicas_step(plain, x, y)
        _close(out, ref_out, "outputs")
        _close(loss, ref_loss, "loss")
        grads = [(n, p.grad, q.grad) for (n, p), q in zip(split.named_parameters(), plain.parameters())
                 if p.requires_grad]
        assert grads and all(g is not None for _, g, _ in grads)
        for name, g, ref in grads:
            _close(g, ref, name)
        for (name, b), ref in zip(split.named_buffers(), plain.buffers()):  # replica 0's statistics
            _close(b, ref, name)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert int(split.stem[1].num_batches_tracked) == 2  # one update a step, not one a part
    # Replica 0's statistics are the first part's, not the whole batch's.
    whole = copy.deepcopy(plain)
    whole(x)
    assert not torch.allclose(whole.stem[1].running_var, split.stem[1].running_var)
    fresh = create_model(cfg.model, cfg.replace(bn_splits=2))
    fresh.load_state_dict(whole.state_dict())  # the same parameters and buffers: checkpoints load
    assert isinstance(fresh.stem[1], SplitBatchNorm2d) and fresh.stem[1].splits == 2


def test_split_batchnorm_in_evaluation_splits_only_batch_statistics():
    cfg = pruned_cfg("resnet18x0.125", 0.6)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    split, plain = _twin_models(cfg)
    split.train(), plain.train()
    split(x), plain(x)  # running statistics now differ: first half against the whole batch
    plain.load_state_dict(split.state_dict())
    split.eval(), plain.eval()
    with torch.no_grad():  # running statistics: every image on its own, as on one GPU
        torch.testing.assert_close(split(x), plain(x), rtol=1e-5, atol=1e-6)
    batch_stats = cfg.replace(bn_track_running_stats=False)
    split, plain = _twin_models(batch_stats)
    split.eval(), plain.eval()
    with torch.no_grad():  # no running statistics: each replica normalises its own half
        halves = torch.cat([plain(x[:3]), plain(x[3:])])
        torch.testing.assert_close(split(x), halves, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(split(x), plain(x), atol=1e-3)
    one = SplitBatchNorm2d(4, splits=2)
    one.train()
    single = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(one(single), F.batch_norm(single, None, None, training=True))
    with pytest.raises(ValueError, match="splits must be >= 1"):
        SplitBatchNorm2d(4, splits=0)
