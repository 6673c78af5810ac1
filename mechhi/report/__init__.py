"""`mechhi report`: one self-contained HTML page about one or more stores (and an
experiment): provenance, the layer ranking, statistics (Kruskal-Wallis, Friedman,
bootstrap), probes side by side and their agreement, figures, a gallery of samples x top
heads, the experiment's Tables 4 and 5 with its audit, and the ablation and editing results.

The page needs nothing but itself: figures are embedded as data URIs, there is no
script and nothing is fetched (the browser test checks that no request leaves it).
Sections are small functions (`sections.SECTIONS`), so new ones are one function each.

>>> build_report(
...     ReportInput([StoreEntry("toy", Path("stores/toy.zarr"), ds)]), "reports/toy"
... )  # doctest: +SKIP
"""

from mechhi.report.page import build_report
from mechhi.report.sections import SECTIONS, ReportInput, StoreEntry

__all__ = ["SECTIONS", "ReportInput", "StoreEntry", "build_report"]
