"""analysis: stored Ray Tune runs of iterand_tune as pandas tables (one row per trial or per epoch,
figure points aggregated over seeds, Parquet round trips), the paper's figures, and the run's
reproduction report (one HTML file, the paper's claims checked).

    from analysis import load_results, aggregate, figure2, write_report
    fig = figure2(load_results("ray_results/quickstart-20261128-110126"))
    write_report("ray_results/quickstart-20261128-110126")   # -> .../report.html
"""
from .figures import figure1, figure2, figure3, save
from .report import (ClaimsError, build_report, check_claims, learning_curves, load_claims,
                     render_report, write_report)
from .results import (ResultsError, aggregate, load_history, load_results, point_keys,
                      read_parquet, to_csv, to_parquet)

__all__ = ["ClaimsError", "ResultsError", "aggregate", "build_report", "check_claims", "figure1",
           "figure2", "figure3", "learning_curves", "load_claims", "load_history", "load_results",
           "point_keys", "read_parquet", "render_report", "save", "to_csv", "to_parquet",
           "write_report"]
