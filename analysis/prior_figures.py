"""The figure of a sweep of token priors (task ``prior``, issue 33): the grid of decoded samples each
finished prior wrote (``samples.png``), one panel per run, titled with its tokenizer, its head, its
validation bits per image and its samples' code usage; an entry of :mod:`analysis.figures`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import new_figure, require, skippable

SAMPLES_PNG = "samples.png"  # experiments.tasks.prior.SAMPLES_PNG (analysis does not import experiments)
MAX_PANELS = 24


def is_prior_sweep(runs: pd.DataFrame) -> bool:
    return "final_val_bits_per_image" in runs and runs["final_val_bits_per_image"].notna().any()


@skippable
def prior_samples(runs: pd.DataFrame) -> Figure:
    """One panel per finished prior with a samples.png (at most MAX_PANELS, in the frame's order)."""
    from PIL import Image

    require(is_prior_sweep(runs), "no run reports final_val_bits_per_image (not a sweep of priors)")
    rows = [r for _, r in runs.iterrows() if (Path(str(r["run_dir"])) / SAMPLES_PNG).is_file()][:MAX_PANELS]
    require(rows, f"no finished prior wrote {SAMPLES_PNG}")
    cols = min(4, len(rows))
    fig, axes = new_figure(math.ceil(len(rows) / cols), cols, height=3.4 * math.ceil(len(rows) / cols))
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, row in zip(axes.flat, rows, strict=False):
        with Image.open(Path(str(row["run_dir"])) / SAMPLES_PNG) as image:
            ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        tokenizer = Path(str(row.get("data.tokenizer_run", ""))).name
        usage, head = row.get("final_sample_usage_fraction"), row.get("model.head")
        head = head if isinstance(head, str) else "full"  # config.json lists the head away from its default only
        ax.set_title(f"{row['run_id']} on {tokenizer}, head {head}\n"
                     f"{row['final_val_bits_per_image']:.0f} bits/image, samples use "
                     f"{usage:.1%} of the codes" if pd.notna(usage) else "", fontsize=8)
    return fig
