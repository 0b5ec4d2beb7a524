"""Run folders -> DataFrames -> figures and reports (docs/ARCHITECTURE.md). Reads files only.

    runs = analysis.load_runs("results/gamma_frac")        # one row per run
    runs = analysis.where(runs, ["quantizer.codebook_size=1024"])  # pick runs (also: report --where)
    metrics = analysis.load_metrics(runs)                   # tidy per-step rows
    analysis.usage_heatmap(runs)                            # a Figure (None if data is missing)
"""

from analysis.aggregate import FRAC, GAMMA, WhereError, curves, grid_summary, parameters, where
from analysis.jsonl import LoadProblem
from analysis.load import LoadWarning, find_run_dirs, load_histograms, load_metrics, load_runs
from analysis.plots import (
    layers,
    rank_frequencies,
    rank_frequency,
    reconstruction_vs_usage,
    training_curves,
    usage_heatmap,
    usage_vs_gamma,
)
from analysis.style import NoData, NoDataWarning

__all__ = [
    "FRAC", "GAMMA", "LoadProblem", "LoadWarning", "NoData", "NoDataWarning",
    "curves", "find_run_dirs", "grid_summary", "layers", "load_histograms", "load_metrics", "load_runs",
    "parameters", "rank_frequencies", "rank_frequency", "reconstruction_vs_usage", "training_curves",
    "usage_heatmap", "usage_vs_gamma", "where", "WhereError", "write_report",
]
# analysis.ablations (issue 8), imported on first use like write_report.
_ABLATIONS = (
    "CLAIMS", "ablation_tables", "claim_figures", "claim_summaries", "claim_table", "clamp_figure", "clamp_probe_figure",
    "clamp_probe_table",
    "entropy_weight_figure", "grid_table", "load_ablations", "load_clamp_probe", "merge_summaries", "read_summaries", "summaries_from_runs",
    "vocab_figure", "write_ablations",
)
__all__ += _ABLATIONS


def __getattr__(name: str) -> object:
    # Imported on first use, so that ``python -m analysis.report`` does not import itself twice.
    if name == "write_report":
        from analysis.report import write_report

        return write_report
    if name in _ABLATIONS:
        from analysis import ablations

        return getattr(ablations, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
