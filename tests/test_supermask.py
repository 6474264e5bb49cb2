"""Mask rule, straight-through gradients, initialisation and re-randomisation (docs/method.md,
sections 1-3). The mask rule is checked through every path that computes it: `supermask()`,
`masked_weight()` and the layers' own forward (`effective_weight()`)."""
import math

import pytest
import torch
import torch.nn.functional as F

from iterand_tune.supermask import (SparseConv2d, SparseLinear, _flat, _kth_smallest_topk,
                                    _threshold, init_, mask_k, masked_weight, rerandomize_,
                                    supermask)


def original_k(n: int, p: float) -> int:
    """The original code's rank: p goes through a percentage, in float64, Python round."""
    return 1 + round(0.01 * float(p * 100) * (n - 1))


def reference_mask(scores: torch.Tensor, p: float) -> torch.Tensor:
    """The mask rule written out the slow way: sort, take the k-th smallest, keep >= it."""
    t = torch.sort(scores.flatten()).values[original_k(scores.numel(), p) - 1]
    return (scores >= t).float()


def layer_mask(scores: torch.Tensor, p: float) -> torch.Tensor:
    """The mask as a layer's forward computes it: `effective_weight()` of a SparseLinear (2-d
    scores; 1-d ones as a column) or SparseConv2d (4-d) holding `scores`, with weights 1."""
    s = scores.reshape(-1, 1) if scores.dim() == 1 else scores
    if s.dim() == 4:
        layer = SparseConv2d(s.shape[1], s.shape[0], s.shape[2], sparsity=p)
    else:
        layer = SparseLinear(s.shape[1], s.shape[0], sparsity=p)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.scores.copy_(s)
    return layer.effective_weight().detach().reshape(scores.shape)


def masks(scores: torch.Tensor, p: float) -> dict[str, torch.Tensor]:
    """The mask of `scores` at sparsity p by every path: path -> 0/1 tensor."""
    return {"supermask": supermask(scores, p),
            "masked_weight": masked_weight(torch.ones_like(scores), scores, p),
            "layer": layer_mask(scores, p)}


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 4096])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.6, 0.7, 0.999])
def test_mask_on_distinct_scores_prunes_k_minus_1(n, p):
    scores = torch.randperm(n).float().reshape(-1, 1) / n  # distinct values
    assert mask_k(n, p) == original_k(n, p)
    for path, m in masks(scores, p).items():
        assert m.shape == scores.shape, path
        assert int(m.sum()) == n - (original_k(n, p) - 1), path
        assert torch.equal(m, reference_mask(scores, p)), path


def test_round_is_half_to_even():
    # p*(n-1) = 0.5 -> 0 pruned; 1.5 -> 2 pruned; 2.5 -> 2 pruned (Python round)
    s = torch.arange(5.0)
    for p, pruned in ((0.125, 0), (0.375, 2), (0.625, 2)):
        for path, m in masks(s, p).items():
            assert int((m == 0).sum()) == pruned, (p, path)
    assert mask_k(5, 0.625) == 3


def test_exact_half_rank_follows_the_percent_form():
    # 128x128x3x3: p * (n - 1) = 0.7 * 147,455 = 103,218.5 exactly, which would round to even
    # (k = 103,219); 0.01 * (0.7 * 100) = 0.7000000000000001 puts it above the half: k = 103,220.
    n = 128 * 128 * 3 * 3
    assert 0.7 * (n - 1) == 103218.5 and 0.01 * (0.7 * 100) > 0.7
    assert mask_k(n, 0.7) == 103220
    torch.manual_seed(8)
    conv = SparseConv2d(128, 128, 3, padding=1, sparsity=0.7)
    with torch.no_grad():
        conv.scores.copy_(torch.randperm(n).float().reshape(conv.scores.shape))  # distinct
    keep = conv.effective_weight() != 0
    assert int(keep.sum()) == n - (103220 - 1) == 44237
    x = torch.randn(1, 128, 4, 4)
    expected = F.conv2d(x, conv.weight * reference_mask(conv.scores.detach(), 0.7), padding=1)
    torch.testing.assert_close(conv(x), expected)  # the forward uses that mask
    # 4,096 entries have an exact half at p = 0.7 too: 0.7 * 4095 = 2866.5 -> k = 2868, not 2867.
    assert mask_k(4096, 0.7) == 2868


def test_half_sparsity_ranks_are_unchanged():
    # 0.01 * (0.5 * 100) is exactly 0.5: p = 0.5 keeps its plain k = 1 + round((n - 1) / 2)
    # (half to even), so every p = 0.5 result (the digits quick start) stays as it was.
    for n in [*range(1, 3000), 1728, 36864, 147456, 589824, 2359296, 2**20]:
        assert mask_k(n, 0.5) == 1 + round(0.5 * (n - 1)), n


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9])
def test_mask_with_ties_keeps_every_score_equal_to_the_threshold(p):
    torch.manual_seed(0)
    scores = torch.randint(0, 5, (20, 30)).float()  # heavy ties
    n = scores.numel()
    for path, m in masks(scores, p).items():
        assert torch.equal(m, reference_mask(scores, p)), path
        assert int(m.sum()) >= n - (mask_k(n, p) - 1), path  # ties can only keep more


def test_constant_scores_keep_everything():
    for path, m in masks(torch.full((3, 4), 0.7), 0.9).items():
        assert torch.equal(m, torch.ones(3, 4)), path


def test_p_zero_keeps_everything_and_negative_zero_ties_positive_zero():
    torch.manual_seed(1)
    for path, m in masks(torch.randn(50), 0.0).items():
        assert torch.equal(m, torch.ones(50)), path
    s = torch.tensor([-0.0, 0.0, 0.0, -0.0, 1.0])
    for path, m in masks(s, 0.5).items():
        assert torch.equal(m, torch.ones(5)), path  # -0.0 == 0.0 as floats


def test_channels_last_scores_are_flattened_without_a_copy():
    torch.manual_seed(9)
    s = torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    assert not s.is_contiguous()
    flat = _flat(s)
    assert flat.dim() == 1 and flat.data_ptr() == s.data_ptr() and flat._base is not None  # a view
    assert torch.equal(flat.sort().values, s.flatten().sort().values)  # the same entries
    for p in (0.3, 0.5, 0.7):
        k = mask_k(s.numel(), p)
        assert _threshold(s, k) == torch.kthvalue(s.flatten(), k).values
        assert _kth_smallest_topk(_flat(s), k) == torch.kthvalue(s.flatten(), k).values
    layer = SparseConv2d(16, 32, 3, sparsity=0.5)
    mask = layer_mask(s.contiguous(), 0.5)
    layer.to(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.scores.copy_(s)
    assert torch.equal(layer.effective_weight().detach(), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_threshold_paths_equal_torch_kthvalue(dtype):
    # CPU floats go through numpy's partition, other devices and dtypes through topk.
    torch.manual_seed(2)
    for shape in [(1,), (2,), (10,), (64, 3, 3, 3), (257, 129)]:
        s = torch.randn(shape).to(dtype)
        for p in (0.0, 0.3, 0.5, 0.77, 0.999):
            k = mask_k(s.numel(), p)
            expected = torch.kthvalue(s.flatten().float(), k).values.to(dtype)
            assert _threshold(s, k) == expected
            if dtype != torch.bfloat16:
                scratch = torch.empty_like(s)
                assert _threshold(s, k, scratch=scratch) == expected
            assert _kth_smallest_topk(s.flatten(), k) == expected


def test_straight_through_gradients():
    torch.manual_seed(3)
    s = torch.randn(6, 5, requires_grad=True)
    g = torch.randn(6, 5)
    supermask(s, 0.5).backward(g)
    assert torch.equal(s.grad, g)  # dL/dS = dL/dM

    w = torch.randn(6, 5, requires_grad=True)
    s2 = s.detach().clone().requires_grad_(True)
    masked_weight(w, s2, 0.5).backward(g)
    m = reference_mask(s2.detach(), 0.5)
    assert torch.allclose(s2.grad, g * w.detach())
    assert torch.allclose(w.grad, g * m)


def test_frozen_weight_gets_no_gradient_and_scores_do():
    torch.manual_seed(4)
    conv = SparseConv2d(3, 8, 3, padding=1, bias=True, sparsity=0.5)
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert conv.weight.grad is None and conv.bias.grad is None
    assert conv.scores.grad is not None and conv.scores.grad.abs().sum() > 0


def test_forward_uses_masked_weight():
    torch.manual_seed(5)
    lin = SparseLinear(10, 4, sparsity=0.6)
    x = torch.randn(3, 10)
    expected = x @ (lin.weight * reference_mask(lin.scores.detach(), 0.6)).T + lin.bias
    assert torch.allclose(lin(x), expected, atol=1e-6)
    dense = SparseLinear(10, 4, sparsity=None)
    assert dense.scores is None
    assert torch.allclose(dense(x), x @ dense.weight.T + dense.bias)
    assert torch.equal(lin.bias, torch.zeros(4))  # biases start at zero


# ----------------------------------------------------------------------------- init


def test_init_distributions_match_spec():
    torch.manual_seed(6)
    t = torch.empty(512, 64, 3, 3)  # fan_in 576
    fan = 576
    gain = math.sqrt(2)
    for scale in (1.0, 2.0):
        init_(t, "kaiming_uniform", scale)
        bound = scale * gain * math.sqrt(3 / fan)
        assert t.abs().max() <= bound and t.abs().max() > 0.99 * bound
        assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
        init_(t, "kaiming_normal", scale)
        assert t.mean().item() == pytest.approx(0, abs=0.01 * scale * gain / math.sqrt(fan))
        assert t.std().item() == pytest.approx(scale * gain / math.sqrt(fan), rel=0.01)
        init_(t, "uniform(-1,1)", scale)
        assert t.min() >= -scale and t.max() <= scale
        assert t.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.01)
        init_(t, "signed_constant", scale)
        c = scale * gain / math.sqrt(fan)
        assert torch.allclose(t.abs(), torch.full_like(t, c))
        assert (t > 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError):
        init_(t, "xavier", 1.0)


def test_linear_fan_in_is_in_features():
    torch.manual_seed(7)
    lin = SparseLinear(200, 300, sparsity=0.5, init_mode="signed_constant")
    assert torch.allclose(lin.weight.abs(), torch.full_like(lin.weight, math.sqrt(2 / 200)))


# ----------------------------------------------------------------------------- IteRand


def _layer(p=0.5, init="kaiming_uniform", seed=0):
    torch.manual_seed(seed)
    return SparseConv2d(16, 32, 3, sparsity=p, init_mode=init)


@pytest.mark.parametrize("r", [0.1, 0.5, 1.0])
def test_bernoulli_replaces_a_fraction_r_of_pruned_weights_only(r):
    layer = _layer()
    w0, s0 = layer.weight.detach().clone(), layer.scores.detach().clone()
    kept = reference_mask(s0, 0.5).bool()
    rerandomize_(layer, "bernoulli", r)
    w1 = layer.weight.detach()
    assert torch.equal(w1[kept], w0[kept])          # kept weights never change
    assert torch.equal(layer.scores.detach(), s0)   # scores never change
    pruned = ~kept
    n = int(pruned.sum())
    changed = int((w1[pruned] != w0[pruned]).sum())
    sd = math.sqrt(n * r * (1 - r))
    assert abs(changed - n * r) <= 5 * sd + 1       # binomial(n, r) bound
    bound = math.sqrt(2) * math.sqrt(3 / (16 * 9))
    assert w1.abs().max() <= bound                  # new values come from the layer's init


def test_r_zero_changes_nothing():
    layer = _layer()
    w0 = layer.weight.detach().clone()
    rerandomize_(layer, "bernoulli", 0.0)
    assert torch.equal(layer.weight, w0)


def test_rerand_rate_uses_the_mask_of_p_times_rate():
    layer = _layer(p=0.8)
    w0, s0 = layer.weight.detach().clone(), layer.scores.detach().clone()
    rerandomize_(layer, "bernoulli", 1.0, rerand_rate=0.5)
    kept = reference_mask(s0, 0.4).bool()
    assert torch.equal(layer.weight[kept], w0[kept])
    assert bool((layer.weight[~kept] != w0[~kept]).all())


def test_manual_mode_formula():
    layer = _layer(init="kaiming_normal")
    w0, s0 = layer.weight.detach().clone(), layer.scores.detach().clone()
    torch.manual_seed(123)
    rerandomize_(layer, "manual", 0.3, rerand_mu=0.7)
    torch.manual_seed(123)
    r = init_(torch.empty_like(w0), "kaiming_normal")  # the same draw
    m = reference_mask(s0, 0.5)
    expected = m * w0 + (1 - m) * (0.3 * w0 + 0.7 * r)
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    assert torch.equal(layer.scores, s0)


def test_signed_constant_redraws_keep_magnitude():
    layer = _layer(init="signed_constant")
    rerandomize_(layer, "bernoulli", 1.0)
    c = math.sqrt(2) / math.sqrt(16 * 9)
    assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, c))


def test_rerandomize_reuses_its_scratch_and_skips_dense_layers():
    layer = _layer()
    rerandomize_(layer, "bernoulli", 0.1)
    ptrs = (layer._rerand_draw.data_ptr(), layer._rerand_pick.data_ptr())
    rerandomize_(layer, "bernoulli", 0.1)
    assert (layer._rerand_draw.data_ptr(), layer._rerand_pick.data_ptr()) == ptrs
    assert "_rerand_draw" not in layer.state_dict()  # scratch, not state
    dense = SparseLinear(4, 4)
    w0 = dense.weight.detach().clone()
    rerandomize_(dense, "bernoulli", 1.0)
    assert torch.equal(dense.weight, w0)


def test_rerandomize_scratch_is_no_buffer_so_data_parallel_does_not_broadcast_it():
    # DataParallel broadcasts every buffer to every replica at every step.
    layer = _layer()
    rerandomize_(layer, "bernoulli", 0.1)
    names = {name for name, _ in layer.named_buffers()}
    assert not names & {"_rerand_draw", "_rerand_pick"}
    assert layer._rerand_draw is not None and "_rerand_draw" not in layer._buffers


def test_rerandomize_scratch_follows_the_weight_to_another_device_or_dtype():
    # model.to() leaves plain attributes where they are: rerandomize_ re-allocates the scratch
    # when it no longer matches the weight (the meta device stands in for a GPU here).
    layer = _layer()
    rerandomize_(layer, "bernoulli", 0.1)
    layer.double()
    w0 = layer.weight.detach().clone()
    rerandomize_(layer, "bernoulli", 1.0)
    assert layer._rerand_draw.dtype == layer._rerand_pick.dtype == torch.float64
    assert not torch.equal(layer.weight, w0)
    layer.to("meta")
    rerandomize_(layer, "bernoulli", 0.5)
    assert layer._rerand_draw.device.type == layer._rerand_pick.device.type == "meta"
    assert layer._rerand_draw.shape == layer.weight.shape


def test_rerandomize_uses_the_percent_form_rank_of_p_times_rate():
    # p * rate = 0.7 on a 128x128x3x3 layer: exactly the half case of the mask rule.
    torch.manual_seed(10)
    conv = SparseConv2d(128, 128, 3, sparsity=0.875)
    n = conv.scores.numel()
    with torch.no_grad():
        conv.scores.copy_(torch.randperm(n).float().reshape(conv.scores.shape))
    w0 = conv.weight.detach().clone()
    rerandomize_(conv, "bernoulli", 1.0, rerand_rate=0.8)
    assert mask_k(n, 0.875 * 0.8) == 103220
    assert int((conv.weight != w0).sum()) == 103219  # r = 1: every weight scored below the k-th
