"""The evaluation inputs, prepared once: the caption batches that perplexity scores and
the closed-ended questions with their batches.

The inputs do not depend on the model being scored, only on the split and the
settings, so `mechhi experiment` builds one `EvalSet` and scores every setup (original,
each adapter) on it: the test split is read, its images decoded and processed once.
It holds the prepared tensors of ``limit`` samples twice (captions and questions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mechhi.data.format import KeyObjectDataset, Sample
from mechhi.data.vqa import option_pool, vqa_items
from mechhi.evaluate.metrics import caption_batches, letter_ids, vqa_batches
from mechhi.finetune import ImageCache
from mechhi.models import PreparedBatch, VLMAdapter


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate. Defaults take well under a minute per setup for the toy model."""

    limit: int | None = 200  # samples of the split (None: all)
    batch_size: int = 16
    vqa_seed: int = 0  # with each sample's id, draws its distractor options and the true option's letter
    generate: int = 3  # greedy captions for the first N samples (0: none)
    max_new_tokens: int = 12
    probe_size: int = 4  # samples in the audit's fixed probe batch


@dataclass(frozen=True)
class EvalSet:
    """One split's evaluation inputs, ready for any model of this adapter's family."""

    samples: list[Sample]  # the evaluated samples (the split up to ``limit``)
    captions: list[PreparedBatch]  # (image, description) for perplexity
    questions: list[PreparedBatch]  # (image, options A-D, true letter) for VQA
    answers: list[int]  # each question's true option
    letters: list[int]  # the token ids of A-D
    images: ImageCache  # the decoded images, for what still prepares its own inputs (captions, the audit)

    @classmethod
    def build(
        cls,
        adapter: VLMAdapter,
        split: KeyObjectDataset | Sequence[Sample],
        settings: EvalSettings,
        *,
        template: str = "caption",
        images: ImageCache | None = None,
    ) -> EvalSet:
        """Prepare ``split`` (up to ``settings.limit``); distractors from the whole dataset."""
        samples = list(split)[: settings.limit] if settings.limit else list(split)
        if not samples:
            raise ValueError("evaluate: the dataset split is empty")
        images = images or ImageCache()
        pictures = images.images(samples)
        size = settings.batch_size
        captions = list(
            caption_batches(
                adapter, pictures, [s.description for s in samples], template=template, batch_size=size
            )
        )
        items = vqa_items(samples, pictures, seed=settings.vqa_seed, pool=option_pool(split))
        questions = list(vqa_batches(adapter, items, batch_size=size))
        return cls(samples, captions, questions, [it.answer for it in items], letter_ids(adapter), images)
