"""Head-scoring probes. Each reads a mechhi store (see ``mechhi.store`` for the dim
vocabulary) and returns labelled xarray results; kernels work on plain numpy arrays
and are labelled once at the edge.

- ``probes.head_impact``: binarised-attention IoU, Head Impact, layer ranking,
  Kruskal-Wallis tests (Sergeev & Kotelnikov 2025).
- ``probes.attention_mass``: threshold-free baselines beside it: attention on the
  image, the object's share of it, and that share over the object's area share.
- ``probes.maps``: reading a store's maps sample by sample for any per-sample kernel.
- ``probes.registry``: every probe by name, what it needs, how it scores a head.
"""
