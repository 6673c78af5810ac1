"""Stage 1, trace: run a model through nnsight and read what its heads do.

- ``sites``: the nnsight paths and ``.source`` labels (the only module that knows them);
- ``attention``: description-row attention on the visual tokens, without ``output_attentions``;
- ``head_outputs``: each head's write into the residual stream (Head Pursuit's signal);
- ``job``: `mechhi trace`, a dataset into a store, resumable;
- ``distributed``: torchrun ranks of one trace (who creates the store, who traces which shards);
- ``pursuit_job``: `mechhi pursuit`, head writes over a dataset, then SOMP.
"""

from .attention import AttentionTracer, BatchIndex, description_attention
from .head_outputs import HeadOutputTracer
from .sites import TracingError, find_attention_call

__all__ = ["AttentionTracer", "BatchIndex", "HeadOutputTracer", "TracingError", "description_attention",
           "find_attention_call"]  # fmt: skip
