"""LLaVA stage 1 for the zoo's pretrained models: only the projector is trained.

The vision tower and the language model stay frozen, so the language model's heads stay
the pretrained ones (what mechhi is meant to study); the projector learns to map the
tower's patch features into the language model's embedding space, on the toy world's
captions and closed questions.

- ``projector``: the seeded, resumable training loop (`mechhi zoo train-projector`);
- ``card``: the model card from ``metrics.json`` (`mechhi zoo card`).
"""
