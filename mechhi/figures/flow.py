"""Knockout figure: the change of the answer's log-probability (and VQA accuracy) per
layer window, one line per cut flow, with paired standard errors."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mechhi.figures.style import new_figure, styled
from mechhi.flow.knockout_job import as_dataset

PANELS = (("answer_logprob", "description log-prob change"), ("vqa_accuracy", "VQA accuracy change"))


@styled
def knockout_figure(report: dict[str, Any]) -> Figure:
    """Window (centre's relative depth) x effect, a line per source->target flow."""
    ds = as_dataset(report)
    fig = new_figure(9.0, 3.6)
    axes = fig.subplots(1, len(PANELS), sharex=True)
    depth = ds["depth"].values
    for ax, (metric, label) in zip(np.atleast_1d(axes), PANELS):
        for pair in ds["pair"].values:
            mean = ds[metric].sel(pair=pair).values
            se = np.nan_to_num(ds[f"{metric}_se"].sel(pair=pair).values)
            ax.errorbar(depth, mean, yerr=se, marker="o", ms=3, capsize=2, label=str(pair))
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel("relative depth of the layer window (centre)")
        ax.set_ylabel(label)
    np.atleast_1d(axes)[0].legend(fontsize=7, frameon=False)
    fig.suptitle(
        f"Attention knockout: {report['model']}, {report['n_samples']} samples, "
        f"windows of {len(report['rows'][0]['layers'])} layers"
    )
    return fig
