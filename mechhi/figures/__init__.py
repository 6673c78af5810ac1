"""matplotlib figures of stores, datasets and experiments (PNG, SVG or PDF by extension).

Each ``*_figure`` function returns a ``matplotlib.figure.Figure`` (drawn without pyplot,
in the one mechhi style); `save` writes it. One module per figure family:

- ``style``: the style, short names, provenance captions, saving by extension and DPI;
- ``summaries``: the numbers the store figures draw (HI grid, per-layer/per-head profiles);
- ``heatmap``: layer x head HI, several stores as panels on one colour scale (paper Fig. 4);
- ``profiles``: mean HI per layer and per head with SE bands and regression (Fig. 5), and
  models compared by relative depth;
- ``overlay``: one head's attention over a sample's image, and the top-N heads as a grid;
- ``sheet``: a dataset's contact sheet;
- ``results``: metric x setup with SE bars, from a small schema any experiment fills;
  ``causal`` fills it from ablation and edit results, ``result_files`` tells the kinds apart.

>>> from mechhi.figures import heatmap_figure, save
>>> save(heatmap_figure([open_store("stores/toy.zarr")]), "hi.svg", dpi=200)  # doctest: +SKIP
"""

from mechhi.figures.causal import from_ablation, from_edit
from mechhi.figures.heatmap import heatmap_figure
from mechhi.figures.overlay import (
    OverlayMaps,
    Picture,
    choose_head,
    overlay_figure,
    overlay_maps,
    top_heads_figure,
)
from mechhi.figures.profiles import compare_figure, layers_figure
from mechhi.figures.result_files import load_results, read_result, result_kind
from mechhi.figures.results import Cell, Metric, ResultTable, from_experiment, results_figure
from mechhi.figures.sheet import sample_sheet, sheet_figure
from mechhi.figures.style import DEFAULT_DPI, FORMATS, PlotError, model_labels, save, short_name
from mechhi.figures.summaries import head_profile, layer_profile, profile, top_heads

__all__ = [
    "DEFAULT_DPI",
    "FORMATS",
    "Cell",
    "Metric",
    "OverlayMaps",
    "Picture",
    "PlotError",
    "ResultTable",
    "choose_head",
    "compare_figure",
    "from_ablation",
    "from_edit",
    "from_experiment",
    "head_profile",
    "heatmap_figure",
    "layer_profile",
    "layers_figure",
    "load_results",
    "model_labels",
    "overlay_figure",
    "overlay_maps",
    "profile",
    "read_result",
    "result_kind",
    "results_figure",
    "sample_sheet",
    "save",
    "sheet_figure",
    "short_name",
    "top_heads",
    "top_heads_figure",
]
