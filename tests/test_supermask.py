"""Mask rule, straight-through gradients, initialisation and re-randomisation (SPEC 1-3)."""
import math

import pytest
import torch

from iterand_tune.supermask import (SparseConv2d, SparseLinear, _kth_smallest_topk, _threshold,
                                    init_, mask_k, masked_weight, rerandomize_, supermask)


def reference_mask(scores: torch.Tensor, p: float) -> torch.Tensor:
    """SPEC 1 written out the slow way: sort, take the k-th smallest, keep >= it."""
    n = scores.numel()
    k = 1 + round(p * (n - 1))
    t = torch.sort(scores.flatten()).values[k - 1]
    return (scores >= t).float()


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 4096])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.6, 0.7, 0.999])
def test_mask_on_distinct_scores_prunes_round_p_n_minus_1(n, p):
    scores = torch.randperm(n).float().reshape(-1, 1) / n  # distinct values
    m = supermask(scores, p)
    assert m.shape == scores.shape
    assert int(m.sum()) == n - round(p * (n - 1))
    assert torch.equal(m, reference_mask(scores, p))


def test_round_is_half_to_even():
    # p*(n-1) = 0.5 -> 0 pruned; 1.5 -> 2 pruned; 2.5 -> 2 pruned (Python round)
    s = torch.arange(5.0)
    assert int((supermask(s, 0.125) == 0).sum()) == 0
    assert int((supermask(s, 0.375) == 0).sum()) == 2
    assert int((supermask(s, 0.625) == 0).sum()) == 2
    assert mask_k(5, 0.625) == 3


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9])
def test_mask_with_ties_keeps_every_score_equal_to_the_threshold(p):
    torch.manual_seed(0)
    scores = torch.randint(0, 5, (20, 30)).float()  # heavy ties
    m = supermask(scores, p)
    assert torch.equal(m, reference_mask(scores, p))
    n = scores.numel()
    assert int(m.sum()) >= n - round(p * (n - 1))  # ties can only keep more


def test_constant_scores_keep_everything():
    assert torch.equal(supermask(torch.full((3, 4), 0.7), 0.9), torch.ones(3, 4))


def test_p_zero_keeps_everything_and_negative_zero_ties_positive_zero():
    torch.manual_seed(1)
    assert torch.equal(supermask(torch.randn(50), 0.0), torch.ones(50))
    s = torch.tensor([-0.0, 0.0, 0.0, -0.0, 1.0])
    assert torch.equal(supermask(s, 0.5), torch.ones(5))  # -0.0 == 0.0 as floats


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


def test_rerandomize_reuses_its_buffers_and_skips_dense_layers():
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
