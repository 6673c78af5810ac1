"""Offline word-level tokenizers for tiny and toy models.

Real checkpoints ship their own tokenizers, but nothing can be downloaded here, so the
tiny test models and the bundled toy model get a word-level tokenizer built from a word
list. Words are split on whitespace and punctuation, so a description's tokens are
exactly its words: that makes "which tokens are the description" easy to check by eye.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BASE_WORDS = [
    "user",
    "assistant",
    "system",
    "what",
    "is",
    "this",
    "photo",
    "a",
    "an",
    "the",
    "of",
    "choose",
    "one",
    "options",
    "shown",
    "in",
    "describe",
    "answer",
    "en",
    "A",
    "B",
    "C",
    "D",
    ".",
    ",",
    "?",
    "!",
    ":",
    ")",
    "(",
    "This",
]


def word_level_tokenizer(
    words: Iterable[str],
    special_tokens: Iterable[str],
    *,
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    eos_token: str | None = None,
    bos_token: str | None = None,
    extra: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose vocabulary is `special_tokens` then `words` (deduplicated).

    `extra` sets named attributes such as ``image_token`` that some processors read from
    the tokenizer.
    """
    vocab: dict[str, int] = {}
    for token in [pad_token, unk_token, *special_tokens, *BASE_WORDS, *words]:
        if token and token not in vocab:
            vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    specials = [t for t in [pad_token, unk_token, *special_tokens] if t]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad_token,
        unk_token=unk_token,
        eos_token=eos_token,
        bos_token=bos_token,
        additional_special_tokens=[t for t in special_tokens if t not in (eos_token, bos_token)],
        extra_special_tokens=extra or {},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer
