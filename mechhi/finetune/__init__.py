"""Stage 5, fine-tune: LoRA on the decoder layers a store's Head Impact ranking picks.

The paper's claim (section 5) is that *which* layers get adapters matters: fine-tuning
the four layers of highest Head Impact moves the model further than the four lowest or
four random ones. To test that claim honestly the layer choice must come from the
store, not be recomputed on the side, and every adapter must say where its layers came
from. One module per step:

- ``select``: the layers from the store's ranking, with provenance;
- ``lora``: peft's surgery on q/k/v of those layers only, checked; counts and norms;
- ``loss``: the answer-token loss (the positions perplexity scores);
- ``data``: splits, the toy fine-tuning set, prepared batches, the seeded order;
- ``train``: the training loop, resumable;
- ``job``: `mechhi finetune`, which writes the adapter directory.

>>> result = finetune(FinetuneConfig(store="stores/toy.zarr", select="top-4"))  # doctest: +SKIP
>>> result.selection.layers, result.params["trainable_pct"]                     # doctest: +SKIP
"""

from .data import ensure_toy_dataset, epoch_order, load_split, micro_batches, prepare_samples
from .job import (
    CHECKPOINT_FILE, LOG_FILE, SELECTION_FILE, FinetuneConfig, FinetuneResult, finetune, read_selection,
    resolve_dataset, resolve_model_id,
)  # fmt: skip
from .lora import (
    LoraSettings, attach_lora, lora_config, lora_layers_of, lora_module_names, lora_norms, parameter_counts,
    quiet_peft,
)  # fmt: skip
from .loss import answer_labels, answer_loss
from .select import Selection, SelectionError, head_impact_fingerprint, parse_spec, select_layers
from .train import History, TrainSettings, train_lora, validation_loss

__all__ = [
    "CHECKPOINT_FILE", "LOG_FILE", "SELECTION_FILE", "FinetuneConfig", "FinetuneResult", "History", "LoraSettings", "Selection", "SelectionError", "TrainSettings",
    "answer_labels", "answer_loss", "attach_lora", "ensure_toy_dataset", "epoch_order", "finetune",
    "head_impact_fingerprint", "load_split", "lora_config", "lora_layers_of", "lora_module_names", "lora_norms",
    "micro_batches", "parameter_counts", "parse_spec", "prepare_samples", "quiet_peft", "read_selection",
    "resolve_dataset", "resolve_model_id", "select_layers", "train_lora", "validation_loss",
]  # fmt: skip
