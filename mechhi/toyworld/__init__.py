"""Stage 6b, the toy world: where the answer is known.

No weights can be downloaded where mechhi is developed, and a random model has no heads
that look at objects, so mechhi ships a world and a model trained on it:

- ``mechhi.data.synthetic``: the world, scenes of 1-3 coloured shapes with exact masks,
  descriptions and questions (`mechhi dataset build --source synthetic`): data, so it
  sits on the data floor where every stage may read it;
- ``mechhi.models.toy``: the toy Qwen2-VL's config and vocabulary;
- here, ``curriculum``: what it is taught, batch by batch;
- ``train``: `mechhi toy train`; ``card``: `mechhi toy card`.

The trained weights live in ``mechhi/zoo/``, which holds nothing else.
"""
