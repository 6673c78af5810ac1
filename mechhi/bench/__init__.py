"""`mechhi bench`: the capture's cost against the plain forward and against eager.

- ``configs``: the benchmarked architectures (real text dimensions, small vision tower)
  and how each gets a given number of visual tokens;
- ``modes``: floor, capture, eager (and an empty nnsight trace), and eager's predicted need;
- ``memory``: peak memory (RSS or CUDA) for the report, live tensor bytes for tests;
- ``job``, ``worker``: one measuring process and what it is asked; ``run``: the processes and their figures;
- ``table``: the report as tables, and the targets checked against it.
"""

from mechhi.bench.run import QUICK, BenchError, BenchOptions, Report, bench
from mechhi.bench.table import report_text, targets

__all__ = ["QUICK", "BenchError", "BenchOptions", "Report", "bench", "report_text", "targets"]
