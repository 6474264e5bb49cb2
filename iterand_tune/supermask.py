"""Supermask layers: the edge-popup mask rule, SparseConv2d / SparseLinear, weight and score
initialisation, and IteRand's in-place re-randomisation of pruned weights (docs/method.md,
sections 1-3).

Nothing here reads a tensor back to the host: thresholds stay on the tensor's device.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

RELU_GAIN = math.sqrt(2.0)


def mask_k(numel: int, sparsity: float) -> int:
    """1-based rank of the threshold score, as the original code computes it:
    k = 1 + round(0.01 * float(p * 100) * (n - 1)) in float64 (Python round, half to even).

    The detour through a percentage is the original's (it stores p in percent) and matters when
    p * (n - 1) is exactly a half: for p = 0.7 and n = 128*128*3*3, 0.01 * (0.7 * 100) is
    0.7000000000000001, so the product rounds up (k = 103,220) where p * (n - 1) = 103,218.5
    would round to even (k = 103,219). See docs/method.md, section 1.
    """
    return 1 + round(0.01 * float(sparsity * 100) * (numel - 1))


def _flat(t: Tensor) -> Tensor:
    """`t`'s entries as a 1-d tensor, a view whenever `t` is dense in memory.

    The k-th smallest value does not depend on the order of the entries, so a channels_last
    4-d tensor is flattened in its memory order (N, H, W, C): `reshape(-1)` in the logical
    order would copy every score tensor at every step.
    """
    t = t.detach()
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # contiguous after the permute: a view
    return t.reshape(-1)


def _threshold(scores: Tensor, k: int, scratch: Optional[Tensor] = None) -> Tensor:
    """The k-th smallest score, as a 0-d tensor on the scores' device (no host sync on GPUs).

    `scratch`, a contiguous tensor like `scores`, lets the CPU path select in place instead
    of allocating a copy.
    """
    flat = _flat(scores)
    if (flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling()):  # torch.compile cannot trace numpy's select
        # numpy's introselect is about twice as fast as torch.kthvalue on CPU, and the
        # threshold is recomputed for every layer at every step.
        if scratch is None or not scratch.is_contiguous():
            a = np.partition(flat.numpy(), k - 1)
        else:
            a = scratch.view(-1).copy_(flat).numpy()
            a.partition(k - 1)
        return torch.from_numpy(a[k - 1:k].copy()).reshape(())
    return _kth_smallest_topk(flat, k)


def _kth_smallest_topk(flat: Tensor, k: int) -> Tensor:
    # On CUDA, topk splits one long slice over many blocks while kthvalue runs one block per
    # slice (pytorch/pytorch#75599: kthvalue 20x slower than sort on large tensors).
    n = flat.numel()
    if k <= n - k + 1:
        return torch.topk(flat, k, largest=False, sorted=False).values.max()
    return torch.topk(flat, n - k + 1, largest=True, sorted=False).values.min()


class _Supermask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, k: int) -> Tensor:  # type: ignore[override]
        return (scores >= _threshold(scores, k)).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None  # straight-through: dL/dS = dL/dM


def supermask(scores: Tensor, sparsity: float) -> Tensor:
    """0/1 mask of `scores`' shape keeping scores >= the k-th smallest (k = mask_k), with a
    straight-through gradient."""
    return _Supermask.apply(scores, mask_k(scores.numel(), sparsity))


class _MaskedWeight(torch.autograd.Function):
    """W * M(S) in one node: saves a bool mask instead of a float one and skips dL/dW when frozen."""

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, k: int) -> Tensor:  # type: ignore[override]
        keep = scores >= _threshold(scores, k)
        ctx.save_for_backward(weight, keep)
        return weight * keep

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, keep = ctx.saved_tensors
        grad_w = grad * keep if ctx.needs_input_grad[0] else None
        grad_s = grad * weight if ctx.needs_input_grad[1] else None  # straight-through mask
        return grad_w, grad_s, None


def masked_weight(weight: Tensor, scores: Tensor, sparsity: float) -> Tensor:
    """`weight * supermask(scores, sparsity)` with the same gradients, in one autograd node."""
    return _MaskedWeight.apply(weight, scores, mask_k(scores.numel(), sparsity))


# ----------------------------------------------------------------------------- init


def fan_in(t: Tensor) -> int:
    return t[0].numel()  # in_features, or in_channels/groups * kernel area


def init_(t: Tensor, mode: str, scale: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fill `t` in place from one of the initialisations of docs/method.md section 2 (fan_in,
    ReLU gain) times `scale`."""
    with torch.no_grad():
        if mode == "kaiming_uniform":
            bound = scale * RELU_GAIN * math.sqrt(3.0 / fan_in(t))
            return t.uniform_(-bound, bound, generator=generator)
        if mode == "kaiming_normal":
            return t.normal_(0.0, scale * RELU_GAIN / math.sqrt(fan_in(t)), generator=generator)
        if mode == "uniform(-1,1)":
            return t.uniform_(-scale, scale, generator=generator)
        if mode == "signed_constant":
            c = scale * RELU_GAIN / math.sqrt(fan_in(t))
            return t.bernoulli_(0.5, generator=generator).mul_(2.0 * c).sub_(c)
    raise ValueError(f"unknown init mode {mode!r}")


# ----------------------------------------------------------------------------- layers


class SparseMixin:
    """Shared state of a prunable layer: frozen random `weight`, trainable `scores`, sparsity p.

    With `sparsity=None` the layer is dense (no scores): the SGD baseline uses it.
    """

    weight: Tensor
    scores: Optional[nn.Parameter]

    def _setup_sparse(self, sparsity: Optional[float], init_mode: str, init_scale: float,
                      init_mode_mask: str, init_scale_score: float) -> None:
        self.init_mode = init_mode
        self.init_scale = init_scale
        init_(self.weight, init_mode, init_scale)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)
        if sparsity is None:
            self.register_parameter("scores", None)
        else:
            if not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
            self.scores = nn.Parameter(init_(torch.empty_like(self.weight), init_mode_mask, init_scale_score))
        self.sparsity = sparsity
        # Scratch space for rerandomize_, allocated on first use and reused. Plain attributes,
        # not buffers: DataParallel would broadcast buffers to every replica at every step, and
        # they are not state. `model.to()` does not move them; rerandomize_ re-allocates them
        # when the weight's device, dtype or shape no longer matches.
        self._rerand_draw: Optional[Tensor] = None
        self._rerand_pick: Optional[Tensor] = None

    def effective_weight(self) -> Tensor:
        if self.scores is None:
            return self.weight
        return masked_weight(self.weight, self.scores, self.sparsity)

    @torch.no_grad()
    def rerandomize_(self, mode: str, rerand_lambda: float, rerand_mu: Optional[float] = None,
                     rerand_rate: float = 1.0) -> None:
        """Re-draw pruned weights in place (docs/method.md section 3); kept weights and scores
        never change."""
        if self.scores is None:
            return
        w = self.weight
        draw, pick = self._rerand_draw, self._rerand_pick
        if (draw is None or pick is None or draw.device != w.device or draw.dtype != w.dtype
                or draw.shape != w.shape or not draw.is_contiguous()):
            # Contiguous whatever w's layout (channels_last): the draws then land on the same
            # elements in either layout, so channels_last does not change which weights IteRand draws.
            draw = self._rerand_draw = torch.empty_like(w, memory_format=torch.contiguous_format)
            pick = self._rerand_pick = torch.empty_like(w, memory_format=torch.contiguous_format)
        # pruned = 1 where S < t(p * rate): the complement of that mask.
        t = _threshold(self.scores, mask_k(self.scores.numel(), self.sparsity * rerand_rate), scratch=draw)
        pick.copy_(self.scores).lt_(t)
        if mode == "bernoulli":
            # pick <- pruned * B, B ~ Bernoulli(r); W <- W * (1 - pick) + R * pick, exact for 0/1 picks.
            draw.bernoulli_(rerand_lambda)
            pick.mul_(draw)
            init_(draw, self.init_mode, self.init_scale)
            draw.mul_(pick)
            w.mul_(pick.neg_().add_(1.0)).add_(draw)
        elif mode == "manual":
            if rerand_mu is None:
                raise ValueError("rerand_mode 'manual' needs rerand_mu")
            # W <- M*W + (1-M)*(lambda*W + mu*R) = W * (1 - P*(1-lambda)) + P*mu*R with P = 1-M.
            init_(draw, self.init_mode, self.init_scale)
            draw.mul_(pick).mul_(rerand_mu)
            w.mul_(pick.mul_(rerand_lambda - 1.0).add_(1.0)).add_(draw)
        else:
            raise ValueError(f"unknown rerand mode {mode!r}")

    def extra_repr(self) -> str:  # type: ignore[misc]
        return super().extra_repr() + f", sparsity={self.sparsity}, init={self.init_mode}"  # type: ignore[misc]


class SparseConv2d(SparseMixin, nn.Conv2d):
    """nn.Conv2d whose forward uses `weight * supermask(scores, sparsity)`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = False, *, sparsity: Optional[float] = None,
                 init_mode: str = "kaiming_uniform", init_scale: float = 1.0,
                 init_mode_mask: str = "kaiming_uniform", init_scale_score: float = 1.0) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride,
                           padding=padding, bias=bias)
        self._setup_sparse(sparsity, init_mode, init_scale, init_mode_mask, init_scale_score)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class SparseLinear(SparseMixin, nn.Linear):
    """nn.Linear whose forward uses `weight * supermask(scores, sparsity)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 sparsity: Optional[float] = None, init_mode: str = "kaiming_uniform",
                 init_scale: float = 1.0, init_mode_mask: str = "kaiming_uniform",
                 init_scale_score: float = 1.0) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._setup_sparse(sparsity, init_mode, init_scale, init_mode_mask, init_scale_score)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


# ----------------------------------------------------------------------------- model-level


def sparse_layers(model: nn.Module) -> Iterator[SparseMixin]:
    """Every prunable layer of `model` that holds scores."""
    for m in model.modules():
        if isinstance(m, SparseMixin) and m.scores is not None:
            yield m


def rerandomize_(model: nn.Module, mode: str, rerand_lambda: float, rerand_mu: Optional[float] = None,
                 rerand_rate: float = 1.0) -> None:
    """Re-randomise the pruned weights of every prunable layer of `model` in place
    (docs/method.md section 3)."""
    for layer in sparse_layers(model):
        layer.rerandomize_(mode, rerand_lambda, rerand_mu, rerand_rate)
