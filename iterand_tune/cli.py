"""Command line. Every error a user can cause ends here as one line on stderr and exit code 2.

    python -m iterand_tune train [--method sgd|edgepopup|iterand] [--set key=value ...]
        trains one trial in this process (no Ray) and prints its metrics every epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from .config import METHODS, ConfigError, TrialConfig, parse_value


class UsageError(Exception):
    """A user error that argparse did not catch; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m iterand_tune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one trial here, without Ray")
    train.add_argument("--method", choices=sorted(METHODS),
                       help="start from the paper's option set for this method (SPEC 7)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a TrialConfig option, e.g. --set lr=0.1 (repeatable)")
    train.add_argument("--data-dir", help="dataset folder (same as --set dataset_dir=DIR)")
    train.add_argument("--download", action="store_true",
                       help="download the dataset if absent (same as --set dataset_download=true)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    train.add_argument("--json", action="store_true", help="print each epoch's metrics as JSON")
    return parser


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
    from .training import Trainer

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
    print(f"{cfg.method}: test accuracy {m['test_acc']:.2f}% with {m['params_after_pruning']:,} of "
          f"{m['params_before_pruning']:,} weights after pruning")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .data import DataError

    try:
        args = _build_parser().parse_args(argv)
        if args.command == "train":
            return _train(args)
        raise UsageError(f"unknown command {args.command!r}")
    except (UsageError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
