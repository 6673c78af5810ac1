"""Head-scoring probes. Each reads a mechhi store (see ``mechhi.store`` for the dim
vocabulary) and returns labelled xarray results; kernels work on plain numpy arrays
and are labelled once at the edge.

- ``probes.head_impact``: binarised-attention IoU, Head Impact, layer ranking,
  Kruskal-Wallis tests (Sergeev & Kotelnikov 2025).
"""
