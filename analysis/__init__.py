"""analysis: stored Ray Tune runs of iterand_tune as pandas tables (one row per trial or per epoch,
figure points aggregated over seeds, Parquet round trips) and the paper's figures.

    from analysis import load_results, aggregate, figure2
    fig = figure2(load_results("ray_results/quickstart-20261128-110126"))
"""
from .figures import figure1, figure2, figure3, save
from .results import (ResultsError, aggregate, load_history, load_results, point_keys,
                      read_parquet, to_csv, to_parquet)

__all__ = ["ResultsError", "aggregate", "figure1", "figure2", "figure3", "load_history",
           "load_results", "point_keys", "read_parquet", "save", "to_csv", "to_parquet"]
