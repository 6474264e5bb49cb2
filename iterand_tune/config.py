"""TrialConfig: every knob of one training trial (docs/method.md), as one frozen, validated dataclass.

Field names are the original project's option names, except `model` (was
`model.config_name`), `dataset` (was `dataset.config_name`) and `epochs` (was `epoch`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Optional

from .vocabulary import DATASET_NAMES, method_of, model_names, parse_model

INIT_MODES = ("kaiming_uniform", "kaiming_normal", "uniform(-1,1)", "signed_constant")
TRAIN_MODES = ("normal", "score_only")
OPTIMIZERS = ("SGD", "AdamW")
LR_SCHEDULERS = ("CustomCosineLR", "MultiStepLR")
RERAND_MODES = ("bernoulli", "manual")
RERAND_FREQ_UNITS = ("iteration", "epoch")
AUTOCAST_DTYPES = ("bf16",)
IMAGENET_DECODERS = ("device", "pil")


class ConfigError(ValueError):
    """An impossible option value; the message names the field and what is allowed."""


class ExperimentError(Exception):
    """A malformed experiment file, search space or selection; printed by the CLI as one line,
    exit 2. (Defined here, beside ConfigError, so that every layer can raise it.)"""


@dataclass(frozen=True)
class TrialConfig:
    """One trial. Defaults are the paper's CIFAR-10 settings (docs/method.md: data, schedule)."""

    # -- what to train ---------------------------------------------------------------
    model: str = "conv6x1.0"            # registry name, e.g. conv6x0.5, resnet18x2.0, resnet50
    dataset: str = "cifar10"            # cifar10 | cifar100 | mnist | digits | imagenet | synthetic_cifar10
    seed: int = 1                       # seeds python, numpy, torch (CPU and CUDA)

    # -- data ------------------------------------------------------------------------
    dataset_dir: str = "data"           # made absolute by the runner before Ray starts
    dataset_download: bool = True       # fetch (md5-checked) when the files are absent
    max_train_dataset_size: Optional[int] = None  # truncate the 45k training split
    train_augmentation: bool = True
    padding_before_crop: bool = True    # pad 4 px before the random-resized crop (CIFAR)
    batch_size: int = 128
    batch_size_eval: int = 512
    num_workers: int = 4                # DataLoader workers, ImageNet only
    # ImageNet's JPEGs: "device" decodes them (torchvision.io.decode_jpeg, nvJPEG on CUDA) and crops
    # them on the trial's device; "pil" decodes and crops with PIL in the DataLoader workers.
    imagenet_decode: Optional[str] = None  # None: "device" on CUDA, "pil" on CPU

    # -- optimisation ------------------------------------------------------------------
    epochs: int = 100
    optimizer: str = "SGD"              # SGD | AdamW
    lr: float = 0.1
    weight_decay: float = 1e-4          # applies to whatever is trained (scores in score_only)
    sgd_momentum: float = 0.9
    lr_scheduler: Optional[str] = "CustomCosineLR"  # CustomCosineLR | MultiStepLR | None (constant)
    warmup_epochs: int = 0
    finetuning_epochs: int = 0
    finetuning_lr: Optional[float] = None
    lr_milestones: Optional[tuple] = None  # MultiStepLR epochs
    multisteplr_gamma: float = 0.1
    train_mode: str = "normal"          # normal (SGD baseline) | score_only (edge-popup, IteRand)

    # -- network -----------------------------------------------------------------------
    bn_affine: bool = True              # true for SGD runs, false for edge-popup / IteRand
    bn_track_running_stats: bool = True
    bn_momentum: float = 0.1
    # BatchNorm statistics over each of bn_splits equal parts of a training batch, as the
    # original's bn_splits-GPU DataParallel computes them on one device (docs/method.md section 4).
    bn_splits: int = 1
    conv_sparsity: float = 0.0          # p: fraction of each prunable layer pruned
    linear_sparsity: Optional[float] = None  # replaces p for the last classifier layer
    init_mode: str = "kaiming_uniform"
    init_mode_linear: Optional[str] = None   # replaces init_mode for the last classifier layer
    init_mode_mask: str = "kaiming_uniform"  # initialisation of the scores
    init_scale: float = 1.0
    init_scale_score: float = 1.0

    # -- IteRand -----------------------------------------------------------------------
    rerand_mode: Optional[str] = None   # None (edge-popup) | bernoulli | manual
    rerand_freq: int = 300              # K_per
    rerand_freq_unit: str = "iteration"  # iteration: every K_per iterations; epoch: K_per times an epoch
    rerand_lambda: Optional[float] = 0.1  # r (bernoulli) or lambda (manual)
    rerand_mu: Optional[float] = None   # mu (manual)
    rerand_rate: float = 1.0            # re-randomise with the mask of sparsity p * rate

    # -- runtime -----------------------------------------------------------------------
    use_cuda: bool = True               # train on the trial's GPU when there is one
    deterministic: bool = True          # cuDNN deterministic algorithms (docs/method.md)
    debug_max_iters: Optional[int] = None  # cap iterations per epoch (smoke tests)
    debug_max_eval_iters: Optional[int] = None  # cap batches of each evaluation (smoke tests)
    # Hyperparameter search trials set this False: the test set must not inform any choice.
    evaluate_test: bool = True          # test accuracy after the last epoch
    # Speed options (docs/gpu.md); the defaults are faithful fp32 eager training.
    channels_last: bool = False         # NHWC model and inputs (tensor-core convs); same maths
    autocast: Optional[str] = None      # None: fp32 | "bf16": bfloat16 autocast of forward + loss
    compile: bool = False               # torch.compile the forward network (a compile per shape)
    cudnn_benchmark: Optional[bool] = None  # None: on exactly when deterministic is false

    def __post_init__(self) -> None:
        _coerce_types(self)
        _validate(self)

    # -- conveniences ------------------------------------------------------------------
    @property
    def method(self) -> str:
        """Figure label: sgd, edgepopup (no effective re-randomisation) or iterand."""
        return method_of(self.train_mode, self.rerand_mode, self.rerand_lambda)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["lr_milestones"] is not None:
            d["lr_milestones"] = list(d["lr_milestones"])
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        """Build from a mapping; unknown keys are refused with the closest known name."""
        for key in values:
            _require_option(key)
        return cls(**values)

    def replace(self, **changes: Any) -> "TrialConfig":
        return self.from_dict({**self.to_dict(), **changes})


_FIELD_TYPES: dict[str, Any] = {}  # filled after the class is built (resolved type hints)


def _require_option(name: str) -> None:
    """ConfigError naming the closest known option when `name` is not a TrialConfig field."""
    if name not in _FIELD_TYPES:
        close = difflib.get_close_matches(name, list(_FIELD_TYPES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown TrialConfig option '{name}'{hint}")

# The paper's three methods as option sets; an experiment adds model, lr, p, ...
METHODS: dict[str, dict[str, Any]] = {
    "sgd": dict(train_mode="normal", bn_affine=True, conv_sparsity=0.0, rerand_mode=None),
    "edgepopup": dict(train_mode="score_only", bn_affine=False, conv_sparsity=0.5, rerand_mode=None),
    "iterand": dict(train_mode="score_only", bn_affine=False, conv_sparsity=0.5,
                    rerand_mode="bernoulli", rerand_freq=300, rerand_lambda=0.1),
}


def parse_value(name: str, text: str) -> Any:
    """Parse a command-line string for field `name` to its declared type (raises ConfigError)."""
    _require_option(name)
    base, optional = field_type(name)
    low = text.strip().lower()
    if optional and low in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is tuple:
            return tuple(int(v) for v in text.strip("[]() ").split(",") if v.strip())
        return text
    except ValueError:
        want = "comma-separated integers" if base is tuple else base.__name__
        raise ConfigError(f"option '{name}' needs {want}{' or none' if optional else ''}, "
                          f"got {text!r}") from None


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional?) of a TrialConfig field."""
    hint = _FIELD_TYPES[name]
    args = typing.get_args(hint)
    if type(None) in args:
        base = next(a for a in args if a is not type(None))
        return base, True
    return hint, False


def _coerce_types(cfg: TrialConfig) -> None:
    """Type-check every field; ints become floats where a float is declared."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        base, optional = field_type(f.name)
        if value is None:
            if not optional:
                raise ConfigError(f"TrialConfig.{f.name} must not be None")
            continue
        ok = True
        if base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                try:
                    object.__setattr__(cfg, f.name, float(value))
                except OverflowError:
                    ok = False
        elif base is str:
            ok = isinstance(value, str)
        elif base is tuple:
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)
            if ok:
                object.__setattr__(cfg, f.name, tuple(value))
        if not ok:
            want = "a list of integers" if base is tuple else base.__name__
            raise ConfigError(
                f"TrialConfig.{f.name} must be {want}{' or None' if optional else ''}, "
                f"got {value!r} ({type(value).__name__})")


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"TrialConfig.{name} = {value!r} is not allowed: {allowed}")


def _choice(cfg: TrialConfig, name: str, choices: tuple, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    listed = ", ".join(repr(c) for c in choices) + (" or None" if optional else "")
    _check(value in choices, name, value, f"must be one of {listed}")


def _validate(cfg: TrialConfig) -> None:
    """Every rule on a trial's options, topic by topic, in the order of the fields: the first
    broken one is the ConfigError."""
    for check in (_check_what, _check_data, _check_optimisation, _check_schedule, _check_network,
                  _check_iterand, _check_runtime):
        check(cfg)


def _check_what(cfg: TrialConfig) -> None:
    """The model, dataset and seed."""
    if parse_model(cfg.model) is None:
        close = difflib.get_close_matches(cfg.model, model_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        _check(False, "model", cfg.model,
               f"unknown model{hint}; known: conv6xF, resnet18xF, resnet34xF, resnet50, resnet101 "
               "(F = width factor > 0)")
    _choice(cfg, "dataset", DATASET_NAMES)
    _check(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")


def _check_data(cfg: TrialConfig) -> None:
    """Data subset, batch sizes, epochs and loader workers."""
    if cfg.max_train_dataset_size is not None:
        _check(cfg.max_train_dataset_size >= 1, "max_train_dataset_size",
               cfg.max_train_dataset_size, "must be >= 1 or None")
    for name in ("batch_size", "batch_size_eval", "epochs"):
        _check(getattr(cfg, name) >= 1, name, getattr(cfg, name), "must be >= 1")
    _check(cfg.num_workers >= 0, "num_workers", cfg.num_workers, "must be >= 0")
    _choice(cfg, "imagenet_decode", IMAGENET_DECODERS, optional=True)


def _check_optimisation(cfg: TrialConfig) -> None:
    """The optimiser and its numbers."""
    _choice(cfg, "optimizer", OPTIMIZERS)
    for name in _FLOAT_FIELDS:  # NaN or inf anywhere would silently poison a trial
        v = getattr(cfg, name)
        _check(v is None or math.isfinite(v), name, v, "must be a finite number")
    for name in ("lr", "weight_decay", "sgd_momentum", "multisteplr_gamma"):
        v = getattr(cfg, name)
        _check(v >= 0, name, v, "must be >= 0")
    _check(cfg.sgd_momentum < 1, "sgd_momentum", cfg.sgd_momentum, "must be in [0, 1)")


def _check_schedule(cfg: TrialConfig) -> None:
    """The learning-rate schedule: warm-up, cosine or steps, fine-tuning; the train mode."""
    _choice(cfg, "lr_scheduler", LR_SCHEDULERS, optional=True)
    _check(cfg.warmup_epochs >= 0, "warmup_epochs", cfg.warmup_epochs, "must be >= 0")
    _check(cfg.finetuning_epochs >= 0, "finetuning_epochs", cfg.finetuning_epochs, "must be >= 0")
    if cfg.lr_scheduler == "CustomCosineLR":
        _check(cfg.warmup_epochs + cfg.finetuning_epochs < cfg.epochs, "warmup_epochs",
               cfg.warmup_epochs,
               f"warmup_epochs + finetuning_epochs must be < epochs ({cfg.epochs}) "
               "so the cosine phase has at least one epoch")
    if cfg.finetuning_epochs > 0:
        _check(cfg.finetuning_lr is not None and cfg.finetuning_lr >= 0, "finetuning_lr",
               cfg.finetuning_lr, "must be a number >= 0 when finetuning_epochs > 0")
    if cfg.lr_scheduler == "MultiStepLR":
        ms = cfg.lr_milestones
        _check(bool(ms) and all(a < b for a, b in zip(ms, ms[1:])) and ms[0] >= 1,
               "lr_milestones", ms, "MultiStepLR needs increasing epochs >= 1, e.g. [50, 75]")
    _choice(cfg, "train_mode", TRAIN_MODES)


def _check_network(cfg: TrialConfig) -> None:
    """Batch norm, sparsity (none for the dense SGD baseline) and initialisations."""
    _check(0.0 <= cfg.bn_momentum <= 1.0, "bn_momentum", cfg.bn_momentum, "must be in [0, 1]")
    _check(1 <= cfg.bn_splits <= cfg.batch_size, "bn_splits", cfg.bn_splits,
           f"must be >= 1 and at most batch_size ({cfg.batch_size}): every part needs an image")
    _check(0.0 <= cfg.conv_sparsity < 1.0, "conv_sparsity", cfg.conv_sparsity, "must be in [0, 1)")
    if cfg.linear_sparsity is not None:
        _check(0.0 <= cfg.linear_sparsity < 1.0, "linear_sparsity", cfg.linear_sparsity,
               "must be in [0, 1) or None")
    if cfg.train_mode == "normal":
        for name in ("conv_sparsity", "linear_sparsity"):
            _check(not getattr(cfg, name), name, getattr(cfg, name),
                   "must be 0 with train_mode 'normal' (the SGD baseline is dense); "
                   "use train_mode 'score_only' to prune")
    _choice(cfg, "init_mode", INIT_MODES)
    _choice(cfg, "init_mode_linear", INIT_MODES, optional=True)
    _choice(cfg, "init_mode_mask", INIT_MODES)
    _check(cfg.init_scale > 0, "init_scale", cfg.init_scale, "must be > 0")
    _check(cfg.init_scale_score > 0, "init_scale_score", cfg.init_scale_score, "must be > 0")


def _check_iterand(cfg: TrialConfig) -> None:
    """Re-randomisation: its mode, period, rate and the parameters each mode needs."""
    _choice(cfg, "rerand_mode", RERAND_MODES, optional=True)
    _check(cfg.rerand_freq >= 1, "rerand_freq", cfg.rerand_freq, "must be >= 1")
    _choice(cfg, "rerand_freq_unit", RERAND_FREQ_UNITS)
    _check(0.0 <= cfg.rerand_rate <= 1.0, "rerand_rate", cfg.rerand_rate, "must be in [0, 1]")
    if cfg.rerand_mode is not None:
        _check(cfg.train_mode == "score_only", "rerand_mode", cfg.rerand_mode,
               "re-randomisation needs train_mode 'score_only'")
        _check(cfg.rerand_lambda is not None, "rerand_lambda", cfg.rerand_lambda,
               f"must be set when rerand_mode is '{cfg.rerand_mode}'")
    if cfg.rerand_mode == "bernoulli":
        _check(0.0 <= cfg.rerand_lambda <= 1.0, "rerand_lambda", cfg.rerand_lambda,
               "r must be in [0, 1] for rerand_mode 'bernoulli'")
    if cfg.rerand_mode == "manual":
        _check(cfg.rerand_mu is not None, "rerand_mu", cfg.rerand_mu,
               "must be set when rerand_mode is 'manual'")


def _check_runtime(cfg: TrialConfig) -> None:
    """Debug caps and the speed options."""
    for name in ("debug_max_iters", "debug_max_eval_iters"):
        v = getattr(cfg, name)
        _check(v is None or v >= 1, name, v, "must be >= 1 or None")
    _choice(cfg, "autocast", AUTOCAST_DTYPES, optional=True)
    if cfg.cudnn_benchmark:
        # Benchmark mode picks the fastest algorithm by timing, which varies from run to run.
        _check(not cfg.deterministic, "cudnn_benchmark", cfg.cudnn_benchmark,
               "needs deterministic=False (cuDNN's autotuner is not deterministic)")


_FIELD_TYPES.update(typing.get_type_hints(TrialConfig))
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TrialConfig))
_FLOAT_FIELDS = tuple(n for n in FIELD_NAMES if field_type(n)[0] is float)
