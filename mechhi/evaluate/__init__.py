"""Stage 5b, evaluate: the same metrics for a base model, an adapter-carrying model or a
model under a head intervention, and the paper's whole comparison.

- ``metrics``: perplexity over answer tokens, closed-ended VQA accuracy and AnsProb, with SEs;
- ``vqa``: the four-option questions; ``generate``: greedy captions;
- ``prepared``: a split's evaluation inputs, prepared once for every model scored on them;
- ``compat``: was an adapter trained on this base model, and does it fit it?
- ``audit``: does the evaluated model really carry its trained adapter?
- ``evaluate_run``: `mechhi evaluate`; ``experiment``: `mechhi experiment` (Tables 4 and 5);
- ``tables``: the experiment's tables as JSON, CSV and text.
"""
