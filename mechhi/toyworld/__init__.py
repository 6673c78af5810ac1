"""Stage 6b, the toy world: where the answer is known.

No weights can be downloaded where mechhi is developed, and a random model has no heads
that look at objects, so mechhi ships a world and a model trained on it:

- ``world``: scenes of 1-3 coloured shapes with exact masks, descriptions and questions
  (`mechhi dataset build --source synthetic`);
- ``model``: the toy Qwen2-VL and its config;
- ``curriculum``: what it is taught, batch by batch;
- ``train``: `mechhi toy train`; ``card``: `mechhi toy card`.

The trained weights live in ``mechhi/zoo/``, which holds nothing else.
"""
