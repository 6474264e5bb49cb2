"""Command line. Every error a user can cause ends here as one line on stderr and exit code 2.

    python -m iterand_tune FILE [KEY ...] [options]
        runs every trial of an experiment file (or of the original YAML config's KEYs) as one
        Ray Tune run; --dry-run lists the trials without starting Ray.
    python -m iterand_tune train [--method sgd|edgepopup|iterand] [--set key=value ...]
        trains one trial in this process (no Ray) and prints its metrics every epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from importlib import metadata
from typing import Any, Iterator, Optional, Sequence

from .config import METHODS, ConfigError, ExperimentError, TrialConfig, parse_value
from .experiments import Experiment, all_trials, load, prepare, select
from .resources import check_address, check_gpus
from .runs import RUN_FILE, read_marker
from .search_plan import DEFAULT_NUM_SAMPLES, DEFAULT_REDUCTION_FACTOR, Point, default_grace_period, \
    points, reproduction, searched_best
from .storage import RunError, absolute, exists, join_path, newest_run
from .terminal import OneLineParser, UsageError, format_table, run_main
from .tracking import MLFLOW_DEFAULT, Tracking, check_installed, mlflow_uri, wandb_offline_runs, \
    wandb_root, wandb_sync_command

# torch is imported only when a trial trains here (`_train`) or a run starts, Ray Tune and
# HyperOpt only when a run or a search starts (`_tune`, `_search`): --help and --dry-run need
# none of them, and `train` works on a machine without Ray, such as a bare GPU box.


def _build_train_parser() -> argparse.ArgumentParser:
    train = OneLineParser(prog="python -m iterand_tune train",
                    description="train one trial here, without Ray")
    train.add_argument("--method", choices=sorted(METHODS),
                       help="start from the paper's option set for this method (docs/method.md, section 7)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a TrialConfig option, e.g. --set lr=0.1 (repeatable)")
    train.add_argument("--data-dir", help="dataset folder (same as --set dataset_dir=DIR)")
    train.add_argument("--download", action="store_true",
                       help="download the dataset if absent: the default already (same as --set dataset_download=true)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    train.add_argument("--json", action="store_true", help="print each epoch's metrics as JSON")
    return train


def _build_run_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m iterand_tune",
                description="Run an experiment file's trials as one Ray Tune run "
                            "(`python -m iterand_tune train --help`: one trial, no Ray).")
    _add_trials_options(p)
    _add_place_options(p)
    _add_resource_options(p)
    _add_session_options(p)
    _add_search_options(p)
    _add_tracking_options(p)
    return p


def _add_trials_options(p: argparse.ArgumentParser) -> None:
    """Which trials: the file, its experiments, what changes in every trial, --dry-run."""
    p.add_argument("file", metavar="FILE",
                   help="experiment file (experiments/figure2.py) or the original config.yaml")
    p.add_argument("keys", nargs="*", metavar="KEY",
                   help="experiments to run (for a YAML config: its experiment keys)")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these experiments")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrialConfig option in every trial (repeatable); "
                        "an overridden grid axis collapses to that value")
    p.add_argument("--smoke-test", action="store_true",
                   help="every trial: one short epoch on a small data subset")
    p.add_argument("--dry-run", action="store_true", help="list the trials; start nothing")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: one JSON object per trial (TrialConfig fields + experiment)")


def _add_place_options(p: argparse.ArgumentParser) -> None:
    """Where the run goes and where its data is."""
    p.add_argument("--storage-path", default="ray_results",
                   help="where results go: a folder (made absolute) or a URI such as s3://bucket/x "
                        "(default: ./ray_results)")
    p.add_argument("--name", help="the run's folder name (default: FILE's name and the time)")
    p.add_argument("--address", help="the Ray to run on: auto (a `ray start` cluster on this "
                                     "machine), local (a new Ray of this run's own), HOST:PORT or "
                                     "ray://HOST:PORT (default: RAY_ADDRESS, else local)")
    p.add_argument("--data-dir", help="dataset folder for every trial (made absolute)")
    p.add_argument("--download", action="store_true",
                   help="download datasets that are absent: the default already "
                        "(dataset_download=true), so this matters only for an experiment that "
                        "sets dataset_download=false")


def _add_resource_options(p: argparse.ArgumentParser) -> None:
    """What each trial asks for, how many run at once, retries and worker processes."""
    p.add_argument("--gpus-per-trial", type=float, metavar="G",
                   help="GPUs per trial: 1/k (0.5, 0.25, ...) or a whole number "
                        "(default: from the model's size, 1/4 for small nets)")
    p.add_argument("--cpus-per-trial", type=float, metavar="C", help="CPUs per trial (default 1; ImageNet trials 1 + num_workers)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at once")
    p.add_argument("--max-failures", type=int, default=3, metavar="N",
                   help="retry a failed trial N times from its last checkpoint (default 3)")
    p.add_argument("--no-reuse-actors", dest="reuse_actors", action="store_false",
                   help="start a new process for every trial instead of reusing worker processes "
                        "(each trial then pays a process start and a torch import)")


def _add_session_options(p: argparse.ArgumentParser) -> None:
    """This session of the run: a resume, and what it prints."""
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (--name, else the newest run of FILE) with "
                        "the options it started with (its run.json)")
    p.add_argument("--report", action="store_true",
                   help="when the run ends (also after an interruption), write its reproduction "
                        "report, one self-contained HTML page, to RUN/report.html "
                        "(docs/analysis.md; any time later: python -m analysis report RUN)")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="what the run prints while it runs: 0 no progress lines, only the final "
                        "table; 1 a line per finished trial and the progress with an ETA "
                        "(default); 2 Ray Tune's own status tables and log lines instead")


def _add_search_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("hyperparameter search (docs/search.md)")
    s.add_argument("--search", action="store_true",
                   help="search each figure point's space (the experiments' `search`) with its own "
                        "HyperOpt TPE and ASHA, on validation accuracy, one seed; writes "
                        "best_configs.parquet/.json into the run's folder")
    s.add_argument("--num-samples", type=int, metavar="N",
                   help="with --search: trials per figure point (default 20)")
    s.add_argument("--grace-period", type=int, metavar="E",
                   help="with --search: ASHA's first rung in epochs (default: a tenth of the "
                        "point's epochs, at least 1)")
    s.add_argument("--reduction-factor", type=float, metavar="F",
                   help="with --search: ASHA keeps the best 1/F at each rung (default 3)")
    s.add_argument("--search-seed", type=int, metavar="S",
                   help="with --search: base of every point's TPE seed (default 0)")
    s.add_argument("--from-search", metavar="RUN",
                   help="run each best configuration of a --search run (its folder or URI) with "
                        "seeds 1, 2, 3 to the end, FIFO, with test accuracy")


def _add_tracking_options(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("experiment tracking (docs/tracking.md; TensorBoard: "
                             "tensorboard --logdir RUN)")
    t.add_argument("--mlflow", nargs="?", const=MLFLOW_DEFAULT, metavar="TRACKING_URI",
                   help="log every trial to MLflow, one run per trial (default ./mlflow.db: a "
                        "local SQLite store, no server; a folder: a file store; or "
                        "http://HOST:5000); needs the mlflow extra: pip install -e '.[mlflow]'")
    t.add_argument("--wandb", metavar="PROJECT",
                   help="log every trial to W&B project PROJECT, grouped by experiment; offline "
                        "under ./wandb without an API key; needs the wandb extra: pip install -e '.[wandb]'")


def overrides_to_dict(pairs: Sequence[str]) -> dict[str, Any]:
    """['lr=0.1', 'model=conv6x0.5'] -> typed values, checked against TrialConfig."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set needs KEY=VALUE, got {pair!r}")
        out[key.strip()] = parse_value(key.strip(), text)
    return out


def _train(args: argparse.Namespace) -> int:
    from .training import Trainer  # torch: only a trial trained here needs it, not `train --help`
    values = dict(METHODS[args.method]) if args.method else {}
    values.update(overrides_to_dict(args.overrides))
    if args.data_dir:
        values["dataset_dir"] = os.path.abspath(args.data_dir)
    if args.download:
        values["dataset_download"] = True
    cfg = TrialConfig.from_dict(values)
    try:
        trainer = Trainer(cfg, device=args.device)
    except RuntimeError as err:  # e.g. an unavailable --device
        raise UsageError(f"cannot start the trial: {str(err).splitlines()[0]}") from None
    print(f"training {cfg.model} on {cfg.dataset} ({cfg.method}, {cfg.epochs} epochs) on "
          f"{trainer.device}", flush=True)
    for m in trainer.fit():
        if args.json:
            print(json.dumps(m), flush=True)
        else:
            line = (f"epoch {m['epoch']:>3}  lr {m['lr']:.4f}  train {m['train_acc']:6.2f}%  "
                    f"loss {m['train_loss']:.4f}  val {m['val_acc']:6.2f}%  ({m['epoch_seconds']:.1f}s)")
            if "test_acc" in m:
                line += f"  test {m['test_acc']:6.2f}%"
            print(line, flush=True)
    if trainer.diverged:
        print(f"error: the training loss diverged ({m['train_loss']}) at epoch {m['epoch']}; "
              f"try a lower lr than {cfg.lr:g} (--set lr=...)", file=sys.stderr)
        return 1
    print(f"{cfg.method}: test accuracy {m['test_acc']:.2f}% with {m['params_after_pruning']:,} of "
          f"{m['params_before_pruning']:,} weights after pruning")
    return 0


def _experiments(args: argparse.Namespace) -> list[Experiment]:
    """The file's chosen experiments as the run will see them (--set, --data-dir, --download,
    --smoke-test applied, data folders absolute)."""
    experiments = load(args.file, args.keys)
    if args.only:
        experiments = select(experiments, args.only, args.file)
    return prepare(experiments, _values(args), args.smoke_test)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    """--set, --data-dir and --download as TrialConfig values."""
    values = overrides_to_dict(args.overrides)
    if args.data_dir:
        values["dataset_dir"] = args.data_dir
    if args.download:
        values["dataset_download"] = True
    return values


def _dry_run(experiments: Sequence[Experiment], as_json: bool) -> int:
    trials = all_trials(experiments)
    if as_json:
        for t in trials:
            print(json.dumps(t))
        return 0
    head = ("#", "experiment", "model", "method", "init", "p", "lr", "wd", "r", "K_per", "epochs",
            "seed")
    rows = []
    for i, t in enumerate(trials, 1):
        cfg = TrialConfig.from_dict({k: v for k, v in t.items() if k != "experiment"})
        iterand = cfg.method == "iterand"
        rows.append((str(i), t["experiment"], cfg.model, cfg.method, cfg.init_mode,
                     f"{cfg.conv_sparsity:g}", f"{cfg.lr:g}", f"{cfg.weight_decay:g}",
                     f"{cfg.rerand_lambda:g}" if iterand else "-",
                     str(cfg.rerand_freq) if iterand else "-", str(cfg.epochs), str(cfg.seed)))
    print(format_table(head, rows))
    print(f"{len(trials)} trials in {len(experiments)} experiment(s); nothing started (--dry-run)")
    return 0


def _run_name(args: argparse.Namespace, storage: str) -> str:
    stem = os.path.splitext(os.path.basename(args.file))[0]
    kind = "search-" if args.search else "reproduce-" if args.from_search else ""
    if args.name:
        if "/" in args.name or args.name in (".", ".."):
            raise UsageError(f"--name {args.name!r} must be a folder name, not a path")
        return args.name
    if not args.resume:
        return f"{stem}-{kind}{time.strftime('%Y%m%d-%H%M%S')}"
    newest = newest_run(storage, f"{stem}-{kind}")  # FILE-[search-|reproduce-]YYYYmmdd-HHMMSS
    if newest is None:
        raise RunError(f"--resume: no earlier run of {stem} under {storage}; pass --name NAME "
                       "of the run to resume")
    return newest


# The options that shape a run: recorded in its run.json, taken back by --resume (which refuses
# a different value). Where the run goes and how it prints (--storage-path, --name, --address,
# --verbose) may change between sessions.
SHAPING = ("keys", "only", "overrides", "smoke_test", "data_dir", "download", "gpus_per_trial",
           "cpus_per_trial", "max_concurrent", "max_failures", "reuse_actors", "search",
           "num_samples", "grace_period", "reduction_factor", "search_seed", "from_search",
           "mlflow", "wandb")


def _flag(name: str) -> str:
    return "FILE's KEYs" if name == "keys" else "--set" if name == "overrides" else \
        "--no-reuse-actors" if name == "reuse_actors" else "--" + name.replace("_", "-")


def _take_marker_flags(args: argparse.Namespace, marker: dict[str, Any], path: str) -> None:
    """--resume: the run's own flags (run.json) for every shaping option not given; one line for
    an option given with another value."""
    recorded = marker.get("flags") or {}
    defaults = _build_run_parser()
    for name in SHAPING:
        if name not in recorded:
            continue
        given, default = getattr(args, name), defaults.get_default(name)
        if given != default and given != recorded[name]:
            if name == "search":
                raise UsageError(f"{path} is a grid run (its run.json): resume it without --search")
            had = (f"the run's {_shown(recorded[name])}" if recorded[name] not in (None, False, [], "")
                   else f"a run started without {_flag(name)}")
            raise UsageError(f"--resume: {_flag(name)} {_shown(given)} contradicts {had} (its "
                             "run.json); drop it: a resumed run keeps the options it started with")
        setattr(args, name, recorded[name])


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _marker(args: argparse.Namespace, kind: str, experiments: Sequence[Experiment],
            search: Any = None) -> dict[str, Any]:
    """run.json: what kind of run, the experiment file (path and text) and names, the options that
    shape it, the planned trials (a grid) or points (a search), each experiment's resources, the
    versions of the package, torch and Ray."""
    try:
        with open(args.file) as f:
            text = f.read()
    except OSError:
        text = None
    marker: dict[str, Any] = {
        "file": os.path.abspath(args.file), "file_text": text,
        "flags": {name: getattr(args, name) for name in SHAPING},
        "command": ["python", "-m", "iterand_tune", *sys.argv[1:]],
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    marker.update(_tune().grid_marker(experiments) if kind == "grid" else search.marker())
    return marker


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in ("iterand_tune", "torch", "ray", "hyperopt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _run(args: argparse.Namespace) -> int:
    """A run of an experiment file: the run resolved (a resume takes the options it started
    with), its experiments loaded, then listed (--dry-run) or started."""
    _check_run_flags(args)
    storage = absolute(args.storage_path)
    resumed = _resumed(args, storage) if args.resume and not args.dry_run else None
    tracking = _tracking(args)
    gpus = _gpus_per_trial(args)
    experiments = _from_search(args) if args.from_search else _experiments(args)
    pts = _search_points(experiments, args) if args.search else []
    if args.dry_run:
        return _dry_run_search(pts, args) if args.search else _dry_run(experiments, args.json)
    name, marker = resumed or (_new_run_name(args, storage), None)
    check_address(args.address)  # a dead cluster is one line, before anything else is said
    tune = _tune()
    search_run = _search_run(pts, args) if args.search else None
    fresh = _marker(args, "search" if args.search else "grid", experiments, search_run)
    if marker is not None:
        _same_plan(marker, fresh, args.file)
    opts = tune.RunOptions(
        storage_path=storage, name=name, marker=marker or fresh, address=args.address,
        gpus_per_trial=gpus, cpus_per_trial=args.cpus_per_trial, max_concurrent=args.max_concurrent,
        max_failures=args.max_failures, resume=args.resume, verbose=args.verbose,
        reuse_actors=args.reuse_actors, tracking=tracking)
    if search_run is not None:
        return _run_search(search_run, args, opts)
    return _run_grid(args, opts, len(experiments))


def _resumed(args: argparse.Namespace, storage: str) -> tuple[str, dict[str, Any]]:
    """--resume: the run's name and its run.json, whose options then replace those not given."""
    name = _run_name(args, storage)
    path = join_path(storage, name)
    if not exists(path):
        raise RunError(f"--resume: there is no run to resume at {path}")
    marker = read_marker(path)
    if marker is None:
        raise RunError(f"--resume: {path} has no {RUN_FILE}: it was started by an older "
                       "version of iterand_tune, or it is not a run's folder; resume it with "
                       "the version that started it, or start it again under a new --name")
    _take_marker_flags(args, marker, path)
    _check_run_flags(args)
    return name, marker


def _new_run_name(args: argparse.Namespace, storage: str) -> str:
    """A new run's folder name, refused when a run is there already."""
    name = _run_name(args, storage)
    path = join_path(storage, name)
    if exists(path):
        raise UsageError(f"{path} already holds a run: add --resume to continue it, "
                         "or choose another --name")
    return name


def _gpus_per_trial(args: argparse.Namespace) -> Optional[float]:
    try:
        return check_gpus(args.gpus_per_trial, "--gpus-per-trial")
    except ValueError as err:
        raise UsageError(str(err)) from None


def _run_grid(args: argparse.Namespace, opts: Any, n_experiments: int) -> int:
    """Every planned trial of a grid run, then its table and what to do next."""
    print(f"{'resuming' if args.resume else 'starting'} {opts.name}: {len(opts.planned)} trials "
          f"of {n_experiments} experiment(s); results in {opts.path}", flush=True)
    summary = _start(opts)
    if summary.interrupted:
        return _interrupted(summary, args, opts.name)
    print()
    print(summary.table())
    notes = (opts.marker.get("experiments") or {}).values()
    for note in dict.fromkeys(e.get("note") for e in notes if e.get("note")):
        print(f"\nnote: {note}")
    _skipped(summary.skipped)
    print(f"\nresults: {summary.path}  ({summary.seconds:.0f} s)")
    print(f"tables and figures: python -m analysis table {summary.path}; "
          f"python -m analysis figure2 {summary.path} -o figure2.png")
    _tracking_notes(summary.path)
    _report(args, summary.path)
    return _grid_exit_code(summary, args, opts.name)


def _grid_exit_code(summary: Any, args: argparse.Namespace, name: str) -> int:
    """1, with a line each, when trials diverged or did not finish; else 0."""
    code = 0
    if summary.diverged:
        print(f"error: {len(summary.diverged)} trial(s) diverged, their training loss not finite "
              f"({_some(summary.diverged)}); they stopped there: try a lower lr", file=sys.stderr)
        code = 1
    failed = summary.errored + summary.unfinished
    if failed:
        advice = f"see their error.txt under {summary.path}, then " if summary.errored else ""
        print(f"error: {len(failed)} trial(s) did not finish ({_some(failed)}); {advice}"
              f"continue with: {_resume_command(args, name)}", file=sys.stderr)
        code = 1
    return code


def _start(opts: Any, search: Any = None) -> Any:
    """The run itself (Ray Tune); its summary."""
    with _data_errors():  # a local run checks each dataset once before Ray starts
        return _tune().run(opts, search=search)


@contextlib.contextmanager
def _data_errors() -> Iterator[None]:
    """A dataset that is missing or broken is the user's to fix: one line, exit 2."""
    from .data import DataError  # torch: only code that reads data raises it, --dry-run never
    try:
        yield
    except DataError as err:
        raise UsageError(str(err)) from None


def _same_plan(marker: dict[str, Any], fresh: dict[str, Any], file: str) -> None:
    """--resume with an experiment file that no longer plans what the run was started with: a
    grid run goes on as started (run.json holds its trials); a search cannot (its points are
    rebuilt from the file)."""
    if marker.get("kind") == "search":
        if marker.get("points") != fresh.get("points"):
            raise RunError(f"--resume: {file} no longer defines the points this search started "
                           f"with ({', '.join(marker.get('points') or [])}); resume it with the "
                           "file as it was (its text is in the run's run.json)")
    elif _plan_text(marker) != _plan_text(fresh):
        print(f"note: {file} has changed since the run started; it resumes with the trials it "
              "started with (its run.json)", flush=True)


def _plan_text(marker: dict[str, Any]) -> str:
    """A grid run's planned trials as text, but their data folders (made absolute from wherever
    the command runs)."""
    trials = [{k: v for k, v in t.items() if k != "dataset_dir"} for t in marker.get("trials") or []]
    return json.dumps(trials, sort_keys=True, default=str)


def _skipped(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"note: {line}")


def _some(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _resume_command(args: argparse.Namespace, name: str) -> str:
    """The command that continues this run: its file, keys and experiments, storage and cluster."""
    words = ["python", "-m", "iterand_tune", args.file, *args.keys, "--resume", "--name", name]
    if args.search:
        words.append("--search")
    if args.from_search:
        words += ["--from-search", args.from_search]
    if args.storage_path != _build_run_parser().get_default("storage_path"):
        words += ["--storage-path", absolute(args.storage_path)]
    if args.address:
        words += ["--address", args.address]
    if args.only:
        words += ["--only", *args.only]
    return " ".join(shlex.quote(w) for w in words)


def _interrupted(summary: Any, args: argparse.Namespace, name: str) -> int:
    """Ctrl-C or SIGTERM: what finished, and how to go on. Exit code 130."""
    i = summary.interrupted
    print(f"\ninterrupted: {i.finished} of {i.total} trials finished", flush=True)
    print()
    print(summary.table())
    print(f"\nresults so far: {summary.path}  ({summary.seconds:.0f} s)")
    _report(args, summary.path)
    print(f"continue with: {_resume_command(args, name)}", flush=True)
    return 130


def _report(args: argparse.Namespace, run_path: str) -> None:
    """--report: the run's reproduction report, named on its own line. A report that cannot be
    written is a note, never the run's failure: `python -m analysis report RUN` retries it."""
    if not args.report:
        return
    from analysis.report import REPORT_FILE, build_report  # pandas, matplotlib: only here
    from analysis.results import write_bytes  # the same package: the report's writer

    try:
        report = build_report(run_path)
        where = join_path(run_path, REPORT_FILE)
        write_bytes(report.html.encode("utf-8"), where)
        verdict = report.summary
    except Exception as err:  # noqa: BLE001 - the run's results are safe; the report is extra
        print(f"note: no report written ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
              f"try: python -m analysis report {run_path}", file=sys.stderr)
        return
    print(f"report: {where}  ({verdict}; open it in a browser)", flush=True)


def _tracking(args: argparse.Namespace) -> Tracking:
    """--mlflow and --wandb, checked before anything starts: their packages are optional."""
    flags = [f for f, v in (("--mlflow", args.mlflow), ("--wandb", args.wandb)) if v is not None]
    check_installed(flags, mlflow=args.mlflow)
    if args.wandb is not None and not args.wandb.strip():
        raise UsageError("--wandb needs a project name")
    return Tracking(mlflow=mlflow_uri(args.mlflow) if args.mlflow is not None else None,
                    wandb=args.wandb, wandb_dir=wandb_root() if args.wandb else None)


def _tracking_notes(run_path: str) -> None:
    """After a run: the command that uploads its offline W&B runs, if it left any."""
    offline = wandb_offline_runs(run_path)
    if offline:
        print(f"W&B runs saved offline (no API key): upload them with: "
              f"{wandb_sync_command(offline)}")


def _tune() -> Any:
    from . import tune  # Ray: optional for `train`, --help and --dry-run (a GPU box may lack it)
    return tune


def _search() -> Any:
    from . import search  # Ray and HyperOpt: only a search needs them
    return search


def _check_run_flags(args: argparse.Namespace) -> None:
    if args.json and not args.dry_run:
        raise UsageError("--json goes with --dry-run")
    for flag, value, low in (("--max-concurrent", args.max_concurrent, 1),
                             ("--max-failures", args.max_failures, 0),
                             ("--num-samples", args.num_samples, 1),
                             ("--grace-period", args.grace_period, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} {value} must be >= {low}")
    if args.cpus_per_trial is not None and not args.cpus_per_trial > 0:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g} must be > 0")
    if args.search and args.from_search:
        raise UsageError("--search and --from-search are two steps: search first, then reproduce")
    if args.reduction_factor is not None and not args.reduction_factor > 1:
        raise UsageError(f"--reduction-factor {args.reduction_factor:g} must be > 1")
    if not args.search:
        used = [f for f, v in (("--num-samples", args.num_samples), ("--grace-period", args.grace_period),
                               ("--reduction-factor", args.reduction_factor),
                               ("--search-seed", args.search_seed)) if v is not None]
        if used:
            raise UsageError(f"{', '.join(used)} go(es) with --search")


# ------------------------------------------------------------------ hyperparameter search

def _search_points(experiments: Sequence[Experiment], args: argparse.Namespace) -> list[Point]:
    """The figure points of the experiments that have a search space."""
    pts = points(experiments)
    if not pts:
        raise UsageError(f"{args.file} defines no search space for "
                         f"{'these experiments' if args.only or args.keys else 'its experiments'}: "
                         "give an Experiment search={option: LogUniform(...), ...} to search")
    skipped = [e.name for e in experiments if not e.search]
    if skipped:
        print(f"not searched (no search space): {', '.join(skipped)}", flush=True)
    return pts


def _num_samples(args: argparse.Namespace) -> int:
    return args.num_samples or DEFAULT_NUM_SAMPLES


def _dry_run_search(pts: Sequence[Point], args: argparse.Namespace) -> int:
    num_samples, rows = _num_samples(args), []
    for p in pts:
        cfg = TrialConfig.from_dict(p.experiment.config)
        grace = min(args.grace_period or default_grace_period(p.epochs), p.epochs)
        rows.append((p.name, cfg.method, str(p.epochs), str(grace), str(cfg.seed),
                     "; ".join(f"{k}: {d.describe()}" for k, d in p.space.items())))
    print(format_table(("point", "method", "epochs", "grace", "seed", "search space"), rows))
    print(f"{len(pts)} figure points x {num_samples} trials = {len(pts) * num_samples} "
          "trials, each point with its own TPE and ASHA; nothing started (--dry-run)")
    return 0


def _search_run(pts: Sequence[Point], args: argparse.Namespace) -> Any:
    """The search's searcher and scheduler (Ray Tune's, HyperOpt's TPE)."""
    return _search().SearchRun(pts, _num_samples(args), args.grace_period,
                               args.reduction_factor or DEFAULT_REDUCTION_FACTOR,
                               args.search_seed or 0)


def _run_search(run: Any, args: argparse.Namespace, opts: Any) -> int:
    search = _search()
    print(f"{'resuming' if args.resume else 'starting'} {opts.name}: search of {len(run.points)} "
          f"figure point(s), {run.per_point} trials each; results in {opts.path}", flush=True)
    summary = _start(opts, search=run)
    if summary.interrupted:
        return _interrupted(summary, args, opts.name)
    print()
    print(summary.table())
    _skipped(summary.skipped)
    written = search.write_best_configs(summary.rows, summary.path) if summary.rows else []
    print(f"\nresults: {summary.path}  ({summary.seconds:.0f} s)")
    _tracking_notes(summary.path)
    if written:
        print(f"best configurations: {written[0]} (and .json); reproduce them with: "
              f"python -m iterand_tune {args.file} --from-search {summary.path}")
    _report(args, summary.path)
    if not summary.ok:
        print(f"error: {len(summary.missing)} figure point(s) have no result "
              f"({', '.join(summary.missing[:3])}); see error.txt under {summary.path}, then "
              f"continue with: {_resume_command(args, opts.name)}", file=sys.stderr)
        return 1
    return 0


def _from_search(args: argparse.Namespace) -> list[Experiment]:
    """The best configurations of a search run, as experiments of seeds 1-3 (FIFO)."""
    rows = searched_best(absolute(args.from_search))
    names = {e.name for e in load(args.file, args.keys)}
    if args.only:
        names &= set(args.only)
    picked = [r for r in rows if r["experiment"] in names]
    if not picked:
        raise UsageError(f"{args.from_search} has no best configuration of "
                         f"{', '.join(sorted(names))}; it has: "
                         f"{', '.join(sorted({r['experiment'] for r in rows}))}")
    return prepare(reproduction(picked), _values(args), args.smoke_test)


USER_ERRORS = (ConfigError, ExperimentError, RunError)  # and DataError, see _data_errors


def _command(argv: list[str]) -> int:
    if not argv:
        raise UsageError("give an experiment file, e.g. `python -m iterand_tune "
                         "experiments/quickstart.py`, or the command `train` for one trial")
    if argv[0] == "train":
        args = _build_train_parser().parse_args(argv[1:])
        with _data_errors():
            return _train(args)
    return _run(_build_run_parser().parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_command, argv, USER_ERRORS)
