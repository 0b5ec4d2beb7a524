"""The notebooks, executed with nbclient against a smoke sweep trained here by experiments.train.

The sweep (diversity_gamma x frac_per_sample_entropy, 2 x 2, one seed, ``scale=smoke``) is also
the contract test between ``experiments`` (writer) and ``analysis`` (reader).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import analysis

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
GAMMAS = (0.0, 2.0)
FRACS = (0.25, 1.0)
# Figures each notebook must show (image/png outputs) on a complete sweep.
MIN_FIGURES = {"utilization.ipynb": 3, "training_dynamics.ipynb": 2, "recipe.ipynb": 5}
# Notebooks about one committed study read its committed CSVs (the smoke sweep has no regime grid).
COMMITTED_DATA = {"recipe.ipynb": REPO / "results" / "recipe"}


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real smoke runs, trained in one subprocess (one torch import, one thread each)."""
    sweep = tmp_path_factory.mktemp("smoke") / "gamma_frac"
    overrides = [[f"quantizer.diversity_gamma={g}", f"quantizer.frac_per_sample_entropy={f}", "scale=smoke"]
                 for g in GAMMAS for f in FRACS]
    script = textwrap.dedent(f"""
        import sys
        from experiments.train import main
        for extra in {overrides!r}:
            code = main(["experiments/configs/synthetic.yaml", *extra, "--out", {str(sweep)!r}])
            if code:
                sys.exit(code)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return sweep


def test_committed_notebooks_are_clean_and_parameterised() -> None:
    assert {p.name for p in NOTEBOOKS} >= set(MIN_FIGURES)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "results_dir" in params[0].source and "LFQ_RESULTS_DIR" in params[0].source
        imported = set()
        for cell in code:
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    imported.add((node.module or "").split(".")[0])
        assert imported <= {"analysis", "os"}, f"{path.name} imports {imported - {'analysis', 'os'}}"


@pytest.mark.slow
def test_real_run_folders_load(smoke_sweep: Path) -> None:
    runs = analysis.load_runs(smoke_sweep)
    assert len(runs) == len(GAMMAS) * len(FRACS) and set(runs["status"]) == {"done"}
    assert runs.attrs["problems"] == ()
    assert set(analysis.parameters(runs)) == {analysis.GAMMA, analysis.FRAC}
    for column in ("final_usage_fraction", "final_perplexity", "final_val_mse", "final_val_psnr", "step"):
        assert runs[column].notna().all(), column
    metrics = analysis.load_metrics(runs)
    assert {"quantizer", "train", "val"} <= set(metrics["kind"].astype(str))
    assert analysis.layers(metrics)
    quantizer = metrics[(metrics["kind"] == "quantizer") & (metrics["mode"] == "train")]
    assert quantizer[["per_sample_entropy", "batch_entropy", "commitment", "usage_fraction"]].notna().all().all()
    hist = analysis.load_histograms(runs)
    assert len(hist) and (hist["count"] > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_draws(path: Path, smoke_sweep: Path, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    monkeypatch.setenv("LFQ_RESULTS_DIR", str(COMMITTED_DATA.get(path.name, smoke_sweep)))
    monkeypatch.setenv("LFQ_ANALYSIS_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on an error cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= MIN_FIGURES.get(path.name, 1)
    # A skipped plot warns on stderr; on a complete sweep none may be skipped.
    assert not [o for o in outputs if o.output_type == "stream" and "skipped" in o.get("text", "")]
