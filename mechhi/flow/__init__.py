"""Where visual information flows: attention knockout, activation patching and attribution
patching, on the same sites the tracer reads (``mechhi.trace.sites``).

- `groups`: named token groups of a sample (description, last, question, image, object,
  background, per view), from the adapter's layout;
- `knockout`: forbid attention edges between groups in a window of layers, by changing the
  mask the model's own attention call receives;
- `counterfactual`: a clean and a corrupted image of one sample (the toy world renders exact
  counterfactuals; any dataset can be corrupted with noise or blur over the object);
- `patching`: copy head outputs (or the residual stream at a group's positions) from the
  clean run into the corrupted one, one site at a time;
- `attribution`: the gradient estimate of every head's patching effect in one forward and
  one backward pass;
- `jobs`: `mechhi knockout` and `mechhi patch` over a store's samples, cached.
"""

from mechhi.flow.groups import GROUPS, TokenGroups, token_groups
from mechhi.flow.knockout import Knockout, knockout_logits

__all__ = ["GROUPS", "Knockout", "TokenGroups", "knockout_logits", "token_groups"]
