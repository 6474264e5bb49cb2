"""The paper's networks (docs/method.md, networks): Conv6 and ResNet18/34/50/101 at any width, built from
supermask layers, BatchNorm over parts of a batch (SplitBatchNorm2d), a name registry (`create_model`)
and parameter counting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .supermask import SparseConv2d, SparseLinear, SparseMixin
from .vocabulary import MODEL_FAMILIES, model_names, parse_model

if TYPE_CHECKING:
    from .config import TrialConfig


@dataclass(frozen=True)
class Layers:
    """How to build each kind of layer, taken from a TrialConfig; passed to the networks."""

    sparsity: Optional[float] = None        # None: dense layers without scores (SGD baseline)
    linear_sparsity: Optional[float] = None
    init_mode: str = "kaiming_uniform"
    init_mode_linear: Optional[str] = None
    init_scale: float = 1.0
    init_mode_mask: str = "kaiming_uniform"
    init_scale_score: float = 1.0
    bn_affine: bool = True
    bn_track_running_stats: bool = True
    bn_momentum: float = 0.1
    bn_splits: int = 1

    @classmethod
    def from_config(cls, cfg: "TrialConfig") -> "Layers":
        masked = cfg.train_mode == "score_only"
        return cls(
            sparsity=cfg.conv_sparsity if masked else None,
            linear_sparsity=cfg.linear_sparsity if masked else None,
            init_mode=cfg.init_mode, init_mode_linear=cfg.init_mode_linear, init_scale=cfg.init_scale,
            init_mode_mask=cfg.init_mode_mask, init_scale_score=cfg.init_scale_score,
            bn_affine=cfg.bn_affine, bn_track_running_stats=cfg.bn_track_running_stats,
            bn_momentum=cfg.bn_momentum, bn_splits=cfg.bn_splits)

    def _score_kwargs(self) -> dict:
        return dict(init_mode_mask=self.init_mode_mask, init_scale_score=self.init_scale_score)

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
             bias: bool = False) -> SparseConv2d:
        return SparseConv2d(cin, cout, kernel, stride, padding, bias, sparsity=self.sparsity,
                            init_mode=self.init_mode, init_scale=self.init_scale, **self._score_kwargs())

    def linear(self, fin: int, fout: int, last: bool = False) -> SparseLinear:
        sparsity = self.sparsity
        if last and self.sparsity is not None and self.linear_sparsity is not None:
            sparsity = self.linear_sparsity
        init_mode = (self.init_mode_linear or self.init_mode) if last else self.init_mode
        return SparseLinear(fin, fout, bias=True, sparsity=sparsity, init_mode=init_mode,
                            init_scale=self.init_scale, **self._score_kwargs())

    def bn(self, channels: int) -> nn.BatchNorm2d:
        kwargs = dict(momentum=self.bn_momentum, affine=self.bn_affine,
                      track_running_stats=self.bn_track_running_stats)
        if self.bn_splits > 1:
            return SplitBatchNorm2d(channels, splits=self.bn_splits, **kwargs)
        return nn.BatchNorm2d(channels, **kwargs)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are those of each of `splits` parts of the batch, as
    nn.DataParallel over `splits` GPUs computes them (docs/method.md section 4).

    The parts are `x.chunk(splits)`, DataParallel's scatter. Each is normalised by its own mean
    and variance; only the first part updates the running statistics (and num_batches_tracked):
    DataParallel's replica on the first GPU shares the module's buffers, the others update
    copies that are thrown away after the step. The gradients are those of the replicas summed,
    which is what autograd gives for one loss over the concatenated outputs. Batch statistics
    are split in evaluation too when there are no running statistics to use. Parameters and
    buffers are BatchNorm2d's, so checkpoints load either way.
    """

    def __init__(self, num_features: int, *, splits: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        self.splits = splits

    def forward(self, x: Tensor) -> Tensor:
        if self.splits == 1 or not (self.training or self.running_mean is None):
            return super().forward(x)  # one part, or running statistics: nothing depends on the batch
        parts = x.chunk(self.splits)
        if len(parts) == 1:  # a batch smaller than the splits: DataParallel uses fewer replicas
            return super().forward(x)
        first = super().forward(parts[0])
        # The other replicas' statistics update nothing that survives the step: leave them out.
        rest = [F.batch_norm(p, None, None, self.weight, self.bias, True, 0.0, self.eps) for p in parts[1:]]
        return torch.cat([first, *rest])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", splits={self.splits}"


# ----------------------------------------------------------------------------- Conv6


class Conv6(nn.Module):
    """Six 3x3 convs (64f, 64f, pool, 128f, 128f, pool, 256f, 256f, pool) and three FC layers."""

    def __init__(self, width: float = 1.0, num_classes: int = 10, layers: Layers = Layers(),
                 image_size: int = 32) -> None:
        super().__init__()
        c1, c2, c3 = int(64 * width), int(128 * width), int(256 * width)
        convs: list[nn.Module] = []
        cin = 3
        for cout in (c1, c1, "pool", c2, c2, "pool", c3, c3, "pool"):
            if cout == "pool":
                convs.append(nn.MaxPool2d(2))
            else:
                convs += [layers.conv(cin, cout, 3, padding=1, bias=True), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*convs)
        side = image_size // 8
        self.classifier = nn.Sequential(
            layers.linear(c3 * side * side, c3), nn.ReLU(inplace=True),
            layers.linear(c3, c3), nn.ReLU(inplace=True),
            layers.linear(c3, num_classes, last=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, layers: Layers) -> None:
        super().__init__()
        self.conv1 = layers.conv(cin, planes, 3, stride, 1)
        self.bn1 = layers.bn(planes)
        self.conv2 = layers.conv(planes, planes, 3, 1, 1)
        self.bn2 = layers.bn(planes)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride, layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, layers: Layers) -> None:
        super().__init__()
        self.conv1 = layers.conv(cin, planes, 1)
        self.bn1 = layers.bn(planes)
        self.conv2 = layers.conv(planes, planes, 3, stride, 1)
        self.bn2 = layers.bn(planes)
        self.conv3 = layers.conv(planes, planes * self.expansion, 1)
        self.bn3 = layers.bn(planes * self.expansion)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride, layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int, layers: Layers) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(layers.conv(cin, cout, 1, stride), layers.bn(cout))


class ResNet(nn.Module):
    """ResNet with a 64-channel stem whatever the width; CIFAR stem at 32 px, ImageNet stem at 224."""

    def __init__(self, block: type, num_blocks: list[int], width: float = 1.0, num_classes: int = 10,
                 layers: Layers = Layers(), image_size: int = 32) -> None:
        super().__init__()
        stem = 64
        if image_size >= 64:  # ImageNet-style: 7x7/2 conv, then 3x3/2 max-pool
            self.stem = nn.Sequential(layers.conv(3, stem, 7, 2, 3), layers.bn(stem), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(layers.conv(3, stem, 3, 1, 1), layers.bn(stem), nn.ReLU(inplace=True))
        cin = stem
        stages = []
        for i, (n, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            planes = int(64 * 2 ** i * width)
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(cin, planes, s, layers))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = layers.linear(cin, num_classes, last=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------- registry

_FAMILIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(family: str) -> Callable:
    """Register a network family; `create_model('<family>x<width>')` then builds it at that width.
    The family must be named in `vocabulary.MODEL_FAMILIES`, which config validation reads
    without importing torch."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"add {family!r} to iterand_tune.vocabulary.MODEL_FAMILIES first")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FAMILIES[family] = fn
        return fn
    return wrap


@register_model("conv6")
def conv6(width: float, num_classes: int, layers: Layers, image_size: int) -> nn.Module:
    return Conv6(width, num_classes, layers, image_size)


@register_model("resnet18")
def resnet18(width: float, num_classes: int, layers: Layers, image_size: int) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], width, num_classes, layers, image_size)


@register_model("resnet34")
def resnet34(width: float, num_classes: int, layers: Layers, image_size: int) -> nn.Module:
    return ResNet(BasicBlock, [3, 4, 6, 3], width, num_classes, layers, image_size)


@register_model("resnet50")
def resnet50(width: float, num_classes: int, layers: Layers, image_size: int) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], width, num_classes, layers, image_size)


@register_model("resnet101")
def resnet101(width: float, num_classes: int, layers: Layers, image_size: int) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 23, 3], width, num_classes, layers, image_size)


def is_known_model(name: str) -> bool:
    return parse_model(name) is not None


__all__ = ["Layers", "SplitBatchNorm2d", "Conv6", "ResNet", "BasicBlock", "Bottleneck", "register_model", "create_model",
           "count_parameters", "estimate_macs", "is_known_model", "model_names"]


def create_model(name: str, config: Optional["TrialConfig"] = None, num_classes: int = 10,
                 image_size: int = 32, layers: Optional[Layers] = None) -> nn.Module:
    """Build a registered network; layer settings (sparsity, init, BN) come from `config`,
    or from an explicit `layers` factory (e.g. one that builds plain torch layers)."""
    parsed = parse_model(name)
    if parsed is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    family, width = parsed
    if layers is None:
        layers = Layers.from_config(config) if config is not None else Layers()
    return _FAMILIES[family](width, num_classes, layers, image_size)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Weights before pruning (scores excluded) and after: minus int(numel * p) per score tensor."""
    before = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("scores"))
    pruned = sum(int(m.scores.numel() * m.sparsity) for m in model.modules()
                 if isinstance(m, SparseMixin) and m.scores is not None)
    return {"params_before_pruning": before, "params_after_pruning": before - pruned}


def estimate_macs(name: str, image_size: int = 32, num_classes: int = 10) -> int:
    """Multiply-accumulates of one image's forward pass (convolutions and linear layers), counted
    on the meta device, so no weights are allocated and no arithmetic is done."""
    total = 0

    def count(module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += out.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features

    def shape_only(module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        # On the meta device F.linear runs a Python decomposition that imports torch._dynamo, 2 s
        # of a driver's start; only the output's shape counts here. (ResNets' F.relu and BatchNorm
        # still import it; Conv6 then needs nothing more.)
        return lambda x: x.new_empty(*x.shape[:-1], module.out_features)

    with torch.device("meta"):
        model = create_model(name, None, num_classes, image_size)
        for module in model.modules():
            module.register_forward_hook(count)
            if isinstance(module, nn.Linear):
                module.forward = shape_only(module)
        model(torch.empty(1, 3, image_size, image_size))
    return total
