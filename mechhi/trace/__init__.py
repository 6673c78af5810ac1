"""Stage 1, trace: run a model through nnsight and read what its heads do.

- ``sites``: the nnsight paths and ``.source`` labels (the only module that knows them);
- ``attention``: description-row attention on the visual tokens, without ``output_attentions``;
- ``head_outputs``: each head's write into the residual stream (Head Pursuit's signal);
- ``trace_dataset``: `mechhi trace`, a dataset into a store, resumable;
- ``distributed``: torchrun ranks of one trace (who creates the store, who traces which shards);
- ``loader``, ``writer``: the data pipeline and the store writes beside the model.

The probes' runners that use these (`mechhi pursuit`, `ground`, all probes of a store)
are one floor up, in `mechhi.scoring`.
"""

from mechhi.trace.attention import AttentionTracer, BatchIndex, description_attention
from mechhi.trace.head_outputs import HeadOutputTracer
from mechhi.trace.sites import TracingError, find_attention_call

__all__ = [
    "AttentionTracer",
    "BatchIndex",
    "HeadOutputTracer",
    "TracingError",
    "description_attention",
    "find_attention_call",
]
