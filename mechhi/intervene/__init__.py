"""Stage 4, intervene: change chosen heads and measure what the change does.

A head ranking is a claim about what heads do; only an intervention tests it.

- ``heads``: the head-edit spec (scale by alpha, mean-replace) and its application through
  nnsight, in a trace, a plain forward or generation: the only place that changes a head;
- ``reference``: each head's mean output over a reference set, for mean ablation;
- ``mechhi.scoring.head_sets`` (a floor down, shared with `ground`): which heads: top/bottom
  by a probe, random sets with the same heads per layer or per depth bin, seeded;
- ``effects``: paired changes against the unedited model, with standard errors, and
  their spread over random seeds;
- ``mechhi.result_cache``: finished setups as JSON keyed by what they depend on;
  ``session``: the store, the lazily loaded model and its editor, shared by the jobs;
- ``heldout``: the default evaluation scenes (held-out toy world);
- ``ablate``: `mechhi ablate`, the causal test of a probe's top heads;
- ``edit``: `mechhi edit`, Head Pursuit's concept-editing experiment.
"""

from mechhi.intervene.heads import EditedModel, Head, HeadEdit, HeadEditor

__all__ = ["EditedModel", "Head", "HeadEdit", "HeadEditor"]
