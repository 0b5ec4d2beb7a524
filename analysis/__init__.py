"""Run folders -> DataFrames -> figures and reports (docs/ARCHITECTURE.md). Reads files only.

    runs = analysis.load_runs("results/gamma_frac")        # one row per run
    runs = analysis.where(runs, ["quantizer.codebook_size=1024"])  # pick runs (also: report --where)
    metrics = analysis.load_metrics(runs)                   # tidy per-step rows
    analysis.usage_heatmap(runs)                            # a Figure (None if data is missing)
"""

from analysis.aggregate import WhereError, curves, grid_summary, parameters, where
from analysis.column_names import FRAC, GAMMA
from analysis.jsonl_reader import LoadProblem
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
# The studies and the figure registry, imported on first use like write_report: name -> module.
_LAZY = {
    "write_report": "report",
    **dict.fromkeys(("CLAIMS", "claim_summaries", "load_ablations", "load_clamp_probe", "read_summaries",
                     "summaries_from_runs"), "claims"),
    **dict.fromkeys(("ablation_tables", "claim_table", "clamp_probe_table", "grid_table"), "tables"),
    **dict.fromkeys(("CLAMP_TRAIN_TITLES", "claim_figures", "clamp_figure", "clamp_probe_figure", "entropy_weight_figure",
                     "vocab_figure"),
                    "claim_figures"),
    "merge_summaries": "merge",
    "write_ablations": "studies",
    **dict.fromkeys(("FIGURES", "Plot", "register"), "figures"),
}
__all__ += [n for n in _LAZY if n not in __all__]


def __getattr__(name: str) -> object:
    # Imported on first use, so that ``python -m analysis.report`` does not import itself twice.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"analysis.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
