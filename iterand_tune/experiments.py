"""Experiments: a name, fixed TrialConfig values and a grid of axes whose every combination is a
trial. Loads experiment files (imported Python modules defining `EXPERIMENTS`) and the original
project's YAML configs (anchors, merge keys, `__default__`, `parallel_grid`).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import itertools
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from .config import FIELD_NAMES, ConfigError, ExperimentError, TrialConfig
from .resources import check_gpus
from .search_space import check_space
from .storage import absolute

__all__ = ["Experiment", "ExperimentError", "select", "smoke_test", "prepare", "all_trials", "load",
           "load_python", "load_yaml", "SMOKE_TEST"]


@dataclass(frozen=True)
class Experiment:
    """One experiment of a figure: `config` holds the values every trial shares, `grid` the axes
    (every combination is one trial, the first axis varying fastest, as in Ray Tune)."""

    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    gpus_per_trial: Optional[float] = None   # None: chosen from the model's size (resources.gpu_share)
    cpus_per_trial: Optional[float] = None   # None: 1 (ImageNet: 1 + num_workers)
    # --search: option -> iterand_tune.search_space domain (LogUniform, Uniform, QUniform, Choice);
    # searched for every figure point (grid combination but the seed) with its own TPE + ASHA.
    search: Mapping[str, Any] = field(default_factory=dict)
    # Printed under the run's table: what its numbers do and do not show (see quickstart.py).
    note: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise ExperimentError(f"experiment name {self.name!r} must be a non-empty word")
        config, grid = dict(self.config), {k: list(v) if isinstance(v, (list, tuple)) else v
                                           for k, v in dict(self.grid).items()}
        for key in [*config, *grid]:
            _require_field(key, self.name)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ExperimentError(f"{self.name}: grid axis '{key}' needs a non-empty list of "
                                      f"values, got {values!r}")
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "grid", grid)
        search = dict(self.search or {})
        if search:
            check_space(self.name, config, grid, search)
        object.__setattr__(self, "search", search)
        try:
            gpus = check_gpus(self.gpus_per_trial, f"{self.name}: gpus_per_trial")
        except ValueError as err:
            raise ExperimentError(str(err)) from None
        object.__setattr__(self, "gpus_per_trial", gpus)
        if self.note is not None and not isinstance(self.note, str):
            raise ExperimentError(f"{self.name}: note must be text, got {self.note!r}")
        if self.cpus_per_trial is not None and not (
                isinstance(self.cpus_per_trial, (int, float)) and self.cpus_per_trial > 0):
            raise ExperimentError(f"{self.name}: cpus_per_trial = {self.cpus_per_trial!r}: "
                                  "needs a number > 0")
        self.trials()  # validate every trial now, not on a worker hours later

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.grid.values())

    def trials(self) -> list[dict[str, Any]]:
        """Every trial as a full TrialConfig dict plus `experiment`, in Ray Tune's grid order."""
        keys = list(self.grid)[::-1]  # itertools.product varies its last axis fastest
        out = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            values = {**self.config, **dict(zip(keys, combo))}
            try:
                cfg = TrialConfig.from_dict(values)
            except ConfigError as err:
                raise ConfigError(f"{self.name}: {err}") from None
            out.append({"experiment": self.name, **cfg.to_dict()})
        return out

    def replace(self, **changes: Any) -> "Experiment":
        return dataclasses.replace(self, **changes)

    def with_values(self, values: Mapping[str, Any]) -> "Experiment":
        """Fix `values` for every trial; an axis (or searched option) that is fixed this way is
        dropped from the grid (or the search space)."""
        return self.replace(config={**self.config, **values},
                            grid={k: v for k, v in self.grid.items() if k not in values},
                            search={k: v for k, v in self.search.items() if k not in values})


def _require_field(key: str, where: str) -> None:
    if key not in FIELD_NAMES:
        close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ExperimentError(f"{where}: unknown TrialConfig option '{key}'{hint}")


# ------------------------------------------------------------------ selection and overrides

def select(experiments: Sequence[Experiment], only: Iterable[str], source: str) -> list[Experiment]:
    """The experiments named in `only` (all when empty), in the order given."""
    only = list(only)
    if not only:
        return list(experiments)
    by_name = {e.name: e for e in experiments}
    picked = []
    for name in only:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ExperimentError(f"{source} has no experiment '{name}'; {hint}"
                                  f"it has: {', '.join(by_name)}")
        if by_name[name] not in picked:
            picked.append(by_name[name])
    return picked


# One short epoch on a small subset, with IteRand re-drawing at least once (--smoke-test).
SMOKE_TEST = dict(epochs=1, warmup_epochs=0, finetuning_epochs=0, max_train_dataset_size=256,
                  debug_max_iters=4, debug_max_eval_iters=1)


def smoke_test(experiment: Experiment) -> Experiment:
    values = dict(SMOKE_TEST)
    rerand = experiment.grid.get("rerand_mode", [experiment.config.get("rerand_mode")])
    if any(m is not None for m in rerand):
        values.update(rerand_freq=2, rerand_freq_unit="iteration")
    return experiment.with_values(values)


def all_trials(experiments: Sequence[Experiment]) -> list[dict[str, Any]]:
    return [t for e in experiments for t in e.trials()]


def prepare(experiments: Sequence[Experiment], values: Mapping[str, Any] = {},
            smoke: bool = False) -> list[Experiment]:
    """The experiments as a run will see them: `values` (--set, --data-dir, --download) fixed in
    every trial, --smoke-test applied, and data folders made absolute (trials run in their own
    folders, maybe on other nodes)."""
    out = []
    for e in experiments:
        if values:
            e = e.with_values(values)
        if smoke:
            e = smoke_test(e)
        if "dataset_dir" in e.grid:
            e = e.replace(grid={**e.grid, "dataset_dir": [absolute(d) for d in e.grid["dataset_dir"]]})
        else:
            e = e.with_values({"dataset_dir": absolute(e.config.get("dataset_dir", TrialConfig.dataset_dir))})
        out.append(e)
    return out


# ------------------------------------------------------------------ loading files

def load(path: str, keys: Sequence[str] = ()) -> list[Experiment]:
    """Experiments of a Python experiment file, or of a YAML config (then `keys` name the entries)."""
    if not os.path.isfile(path):
        raise ExperimentError(f"no experiment file at {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml"):
        if not keys:
            raise ExperimentError(f"name the experiment keys to run from {path}, e.g. "
                                  f"python -m iterand_tune {path} figure2_conv6_ku_sgd")
        return load_yaml(path, keys)
    if ext != ".py":
        raise ExperimentError(f"{path}: an experiment file is a .py module or an original "
                              ".yaml config")
    experiments = load_python(path)
    return select(experiments, keys, path)


def load_python(path: str) -> list[Experiment]:
    """Import `path` as a module (not exec into our globals) and return its EXPERIMENTS."""
    stem = os.path.splitext(os.path.basename(path))[0]
    mod_name = f"iterand_tune_experiment_{stem}"
    spec = importlib.util.spec_from_file_location(mod_name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ExperimentError(f"{path} line {err.lineno}: {err.msg}") from None
    except (ExperimentError, ConfigError) as err:
        raise ExperimentError(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a broken user file, reported in one line
        line = _user_line(err, path)
        raise ExperimentError(f"{path}{line}: {type(err).__name__}: {err}") from None
    finally:
        sys.modules.pop(mod_name, None)
    experiments = getattr(module, "EXPERIMENTS", None)
    if not experiments:
        raise ExperimentError(f"{path} defines no experiments: it needs a non-empty list "
                              "EXPERIMENTS = [Experiment(...), ...]")
    if not isinstance(experiments, (list, tuple)) or not all(
            isinstance(e, Experiment) for e in experiments):
        raise ExperimentError(f"{path}: EXPERIMENTS must be a list of iterand_tune.experiments."
                              "Experiment")
    names = [e.name for e in experiments]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExperimentError(f"{path}: experiment names must be unique; repeated: {', '.join(dup)}")
    return list(experiments)


def _user_line(err: BaseException, path: str) -> str:
    tb, line = err.__traceback__, ""
    target = os.path.abspath(path)
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
            line = f" line {tb.tb_lineno}"
        tb = tb.tb_next
    return line


# Original option names that became something else, or that Ray Tune now owns.
YAML_RENAMED = {"model.config_name": "model", "dataset.config_name": "dataset", "epoch": "epochs"}
YAML_IGNORED = frozenset({"output_dir", "sync_dir", "checkpoint_epochs", "seed_by_time",
                          "load_checkpoint_path", "save_best_model", "print_train_loss",
                          "learning_framework"})


def load_yaml(path: str, keys: Sequence[str]) -> list[Experiment]:
    """Experiments named `keys` from an original-format YAML config."""
    import yaml  # PyYAML: only the original configs need it, and a GPU box may not have it

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)  # SafeLoader resolves anchors and `<<` merge keys
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ExperimentError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(doc, dict):
        raise ExperimentError(f"{path} is not a YAML mapping of experiment keys")
    default = doc.get("__default__") or {}
    out = []
    for key in dict.fromkeys(keys):
        if key not in doc or key.startswith("__"):
            candidates = [k for k, v in doc.items() if isinstance(v, dict) and not k.startswith("__")]
            close = difflib.get_close_matches(key, candidates, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ExperimentError(f"{path} has no experiment key '{key}'{hint}")
        entry = doc[key]
        if not isinstance(entry, dict):
            raise ExperimentError(f"{path}: '{key}' is not a mapping of options")
        out.append(_from_yaml_entry(key, {**default, **entry}, path))
    return out


def _from_yaml_entry(name: str, entry: dict[str, Any], path: str) -> Experiment:
    config: dict[str, Any] = {}
    grid: dict[str, list] = {}
    splits = None
    for key, value in entry.items():
        if key == "parallel_grid":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ExperimentError(f"{path}: {name}.parallel_grid must map options to lists")
            for gkey, values in value.items():
                grid[YAML_RENAMED.get(gkey, gkey)] = values if isinstance(values, list) else [values]
        elif key == "num_gpus":
            # The original split a trial's batch over num_gpus GPUs (DataParallel), each
            # normalising its part: here one whole GPU computes the same with bn_splits, as
            # figure3.py does. Single-GPU trials keep their fractional share.
            if isinstance(value, int) and value > 1:
                splits = value
        elif key in YAML_IGNORED:
            continue
        else:
            config[YAML_RENAMED.get(key, key)] = value
    for key in list(config):
        if key in grid:
            del config[key]  # the grid decides
    if isinstance(config.get("lr_milestones"), list):
        config["lr_milestones"] = tuple(config["lr_milestones"])
    if splits is not None and "bn_splits" not in grid:
        config.setdefault("bn_splits", splits)
    try:
        return Experiment(name=name, config=config, grid=grid, gpus_per_trial=None if splits is None else 1.0)
    except (ExperimentError, ConfigError) as err:
        raise ExperimentError(f"{path}: {err}") from None
