"""Search efficiency: ASHA + TPE (`--search`) against an exhaustive grid over the same candidates.

One IteRand figure point on digits (Conv6 x0.25, CPU): 4 learning rates x 3 weight decays x
3 re-randomisation rates = 36 candidate configurations. The grid trains every candidate for all
epochs (in this process, two at a time); the search runs `iterand_tune.search` through Ray Tune
(one TPE and one ASHA for the point, Choice domains over the same values) with fewer trials.
Prints the epochs each one spent, their ratio, and the validation accuracy (best over the epochs,
as the search ranks trials) of each one's chosen configuration, measured by the grid's full
training; it prints how long each took.
    python benchmarks/search_efficiency.py [--num-samples 16] [--epochs 8] [--grace-period 2]
ASHA's first rung is at epoch 2, not 1: after one epoch the large learning rates that end best
still look worst (short-horizon bias), and a first rung there stops them.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iterand_tune.experiments import Experiment  # noqa: E402
from iterand_tune.search import SearchRun, points  # noqa: E402
from iterand_tune.search_space import Choice  # noqa: E402

LRS = [0.03, 0.1, 0.3, 1.0]
WEIGHT_DECAYS = [1e-5, 1e-4, 1e-3]
RERAND_LAMBDAS = [0.01, 0.1, 0.3]
CANDIDATES = dict(lr=LRS, weight_decay=WEIGHT_DECAYS, rerand_lambda=RERAND_LAMBDAS)


def base_config(epochs: int) -> dict:
    return dict(dataset="digits", model="conv6x0.25", epochs=epochs, batch_size=64,
                train_augmentation=False, train_mode="score_only", bn_affine=False,
                conv_sparsity=0.5, init_mode="kaiming_uniform", rerand_mode="bernoulli",
                rerand_freq=10, lr=0.3, weight_decay=1e-4, rerand_lambda=0.1, seed=1,
                evaluate_test=False, dataset_dir=os.path.abspath("data"))


def train_candidate(args: tuple) -> tuple[tuple, float, int]:
    """(candidate, best val acc, epochs) of one full training, on one thread."""
    import torch

    from iterand_tune.config import TrialConfig
    from iterand_tune.training import Trainer

    torch.set_num_threads(1)  # as a 1-CPU Ray trial: the same numbers
    epochs, candidate = args
    cfg = TrialConfig.from_dict({**base_config(epochs), **dict(zip(CANDIDATES, candidate))})
    trainer = Trainer(cfg, device="cpu")
    for m in trainer.fit():
        pass
    return candidate, trainer.best_val_acc, trainer.epoch


def run_grid(epochs: int, workers: int) -> tuple[dict, int, float]:
    start = time.time()
    jobs = [(epochs, c) for c in itertools.product(*CANDIDATES.values())]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        out = pool.map(train_candidate, jobs)
    return {c: acc for c, acc, _ in out}, sum(e for _, _, e in out), time.time() - start


def run_search(epochs: int, num_samples: int, grace: int, rf: float) -> tuple[dict, float]:
    from iterand_tune.tune import RunOptions, run

    experiment = Experiment("bench_iterand", base_config(epochs), {},
                            search={k: Choice(v) for k, v in CANDIDATES.items()})
    search = SearchRun(points([experiment]), num_samples, grace_period=grace,
                       reduction_factor=rf, seed=0)
    with tempfile.TemporaryDirectory() as storage:
        opts = RunOptions(storage_path=storage, name="search", marker=search.marker(),
                          cpus_per_trial=1, verbose=0)
        start = time.time()
        summary = run(opts, search=search)
        seconds = time.time() - start
    if not summary.rows:
        raise SystemExit("the search produced no result")
    return summary.rows[0], seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=16, help="search trials")
    p.add_argument("--grace-period", type=int, default=2)
    p.add_argument("--reduction-factor", type=float, default=3)
    p.add_argument("--workers", type=int, default=2, help="grid trainings at once")
    args = p.parse_args()

    n = len(list(itertools.product(*CANDIDATES.values())))
    print(f"one IteRand point on digits, conv6x0.25, {args.epochs} epochs; {n} candidates "
          f"(lr {LRS} x weight decay {WEIGHT_DECAYS} x r {RERAND_LAMBDAS})", flush=True)
    row, search_s = run_search(args.epochs, args.num_samples, args.grace_period, args.reduction_factor)
    grid, grid_epochs, grid_s = run_grid(args.epochs, args.workers)

    best = max(grid, key=grid.get)
    chosen = tuple(row["searched"][k] for k in CANDIDATES)
    chosen_full = grid[chosen]
    describe = lambda c: ", ".join(f"{k}={v:g}" for k, v in zip(CANDIDATES, c))  # noqa: E731
    print()
    print(f"{'':26}{'epochs':>8}{'wall s':>9}  chosen configuration -> best val acc %")
    print(f"{'exhaustive grid':26}{grid_epochs:>8}{grid_s:>9.0f}  {describe(best)} -> {grid[best]:.2f}")
    print(f"{'ASHA + TPE search':26}{row['epochs_spent']:>8}{search_s:>9.0f}  {describe(chosen)} -> "
          f"{chosen_full:.2f} (full training; {row['best_val_acc']:.2f} in the search, "
          f"{row['epochs_trained']} epochs)")
    print(f"\nsearch trials: {row['trials']} ({args.num_samples} asked), grace {args.grace_period}, "
          f"reduction factor {args.reduction_factor:g}")
    print(f"epoch ratio (grid / search): {grid_epochs / row['epochs_spent']:.2f}x")
    print(f"val acc difference (chosen by search - grid's best): {chosen_full - grid[best]:+.2f} points")
    ranked = sorted(grid.values(), reverse=True)
    print(f"the search's choice ranks {ranked.index(chosen_full) + 1} of {n} in the grid; "
          f"grid val acc range {ranked[-1]:.2f}-{ranked[0]:.2f}")
    print("grid's top five: " + "; ".join(f"{describe(c)} {grid[c]:.2f}"
                                          for c in sorted(grid, key=grid.get, reverse=True)[:5]))


if __name__ == "__main__":
    main()
