"""Search-space domains that experiment files use (`search=dict(lr=LogUniform(1e-3, 1), ...)`),
and the check that every value a domain allows makes a valid trial. Ray-free: Ray Tune's own
domains are built from these only when a search starts (`Domain.to_tune`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .config import FIELD_NAMES, ConfigError, ExperimentError, TrialConfig, field_type

__all__ = ["Domain", "LogUniform", "Uniform", "QUniform", "Choice", "cast", "check_space"]


class Domain:
    """One dimension of a search space. `to_tune()` builds Ray Tune's domain (Ray is imported
    then, not when an experiment file is loaded); `examples()` are values that must all make a
    valid TrialConfig (checked when the experiment is defined); `clip` puts a sampled value back
    inside the domain (HyperOpt's quantised draws can land just outside)."""

    def to_tune(self) -> Any:
        raise NotImplementedError

    def examples(self) -> list:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def clip(self, value: Any) -> Any:
        return value


def _ray_tune() -> Any:
    from ray import tune  # optional heavy dependency: experiment files load without Ray
    return tune


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _Range(Domain):
    """A float in [low, high], drawn by Ray Tune's `_draw` (`loguniform`, `uniform`); a log
    scale needs low > 0."""
    low: float
    high: float
    _draw = ""
    _label = ""

    def __post_init__(self) -> None:
        positive = self._draw != "loguniform" or (_number(self.low) and self.low > 0)
        if not (_number(self.low) and _number(self.high) and self.low < self.high and positive):
            rule = "0 < low < high" if self._draw == "loguniform" else "low < high"
            raise ExperimentError(f"{type(self).__name__}({self.low!r}, {self.high!r}) needs {rule}")

    def to_tune(self) -> Any:
        return getattr(_ray_tune(), self._draw)(self.low, self.high)

    def describe(self) -> str:
        return f"{self._label}({self.low:g}, {self.high:g})"

    def examples(self) -> list:
        return [self.low, self.high]

    def clip(self, value: Any) -> Any:
        return min(max(value, self.low), self.high)


class LogUniform(_Range):
    """A float drawn log-uniformly from [low, high] (learning rates, weight decay)."""
    _draw, _label = "loguniform", "log-uniform"


class Uniform(_Range):
    """A float drawn uniformly from [low, high] (sparsity, re-randomisation rate)."""
    _draw, _label = "uniform", "uniform"


@dataclass(frozen=True)
class QUniform(Domain):
    """An integer from low, low + q, ..., high, uniformly (K_per = rerand_freq)."""
    low: int
    high: int
    q: int = 1

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.q))
        if not (ints and self.q >= 1 and self.low < self.high and (self.high - self.low) % self.q == 0):
            raise ExperimentError(f"QUniform({self.low!r}, {self.high!r}, q={self.q!r}) needs "
                                  "integers low < high with high - low a multiple of q >= 1")

    def to_tune(self) -> Any:
        return _ray_tune().qrandint(self.low, self.high, self.q)

    def examples(self) -> list:
        return [self.low, self.high]

    def describe(self) -> str:
        return f"integers {self.low}..{self.high}" + (f" step {self.q}" if self.q > 1 else "")

    def clip(self, value: Any) -> Any:
        value = self.low + self.q * round((value - self.low) / self.q)
        return int(min(max(value, self.low), self.high))


@dataclass(frozen=True)
class Choice(Domain):
    """One of a few values (a discrete candidate set)."""
    values: tuple

    def __post_init__(self) -> None:
        values = tuple(self.values) if isinstance(self.values, (list, tuple)) else None
        if not values:
            raise ExperimentError(f"Choice({self.values!r}) needs a non-empty list of values")
        object.__setattr__(self, "values", values)

    def to_tune(self) -> Any:
        return _ray_tune().choice(list(self.values))

    def examples(self) -> list:
        return list(self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(f"{v:g}" if _number(v) else repr(v) for v in self.values)


def cast(key: str, value: Any) -> Any:
    """A sampled value in the TrialConfig field's type (HyperOpt hands out floats for integers)."""
    base, _ = field_type(key)
    if base is int and _number(value):
        return int(round(value))
    if base is float and _number(value):
        return float(value)
    return value


def check_space(name: str, config: Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
                space: Mapping[str, Any]) -> None:
    """An experiment's search space: keys are TrialConfig options that are not grid axes, values
    are Domains whose every example makes a valid trial. Raises ExperimentError."""
    base = {**config, **{k: v[0] for k, v in grid.items()}}
    for key, domain in space.items():
        if key not in FIELD_NAMES:
            raise ExperimentError(f"{name}: search space names unknown TrialConfig option '{key}'")
        if key in grid:
            raise ExperimentError(f"{name}: '{key}' is a grid axis; it cannot also be searched "
                                  "(grid axes define the figure points)")
        if key == "seed":
            raise ExperimentError(f"{name}: the seed is not searched (a search uses the first seed)")
        if not isinstance(domain, Domain):
            raise ExperimentError(f"{name}: search['{key}'] = {domain!r} must be a domain of "
                                  "iterand_tune.search_space (LogUniform, Uniform, QUniform, Choice)")
        for value in domain.examples():
            try:
                TrialConfig.from_dict({**base, key: cast(key, value)})
            except ConfigError as err:
                raise ExperimentError(f"{name}: search['{key}'] allows {value!r}, but {err}") from None
