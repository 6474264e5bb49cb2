"""Ray Tune, by job: the trainable (`trainable`), the searchers that own a run's trials
(`searchers`), the Tuner of a run and its resume (`runner`, `resume`), progress lines (`progress`),
Ctrl-C and SIGTERM (`interrupts`) and the end-of-run summary (`summary`). What the project assumes
of Ray Tune beyond its documented API lives in `iterand_tune.ray_assumptions`.
"""
from ..storage import TRIAL_KEY, RunError
from .progress import ProgressLines, say
from .runner import RunOptions, grid_marker, run
from .summary import Interruption, RunSummary
from .trainable import train_trial, trial_name

__all__ = ["RunOptions", "RunSummary", "Interruption", "ProgressLines", "run", "grid_marker", "train_trial",
           "trial_name", "say", "TRIAL_KEY", "RunError"]
