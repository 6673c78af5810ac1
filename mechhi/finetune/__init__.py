"""Stage 5, fine-tune: LoRA on the decoder layers a store's Head Impact ranking picks.

The paper's claim (section 5) is that *which* layers get adapters matters: fine-tuning
the four layers of highest Head Impact moves the model further than the four lowest or
four random ones. To test that claim honestly the layer choice must come from the
store, not be recomputed on the side, and every adapter must say where its layers came
from. One module per step:

- ``select``: the layers from the store's ranking, with provenance;
- ``lora``: peft's surgery on q/k/v of those layers only, checked; counts and norms;
- ``loss``: the answer-token loss (the positions perplexity scores);
- ``order``: which samples each step and each process sees, a pure function of the step;
- ``training_data``: the prepared training samples and the toy fine-tuning set (splits and
  image decoding are `mechhi.data`'s: ``splits``, ``images``);
- ``depth``: the depth-matched control's draw (depth-K);
- ``accel``, ``checkpoint``, ``validate``, ``train``: the loop on accelerate, its atomic
  checkpoints and its validation loss;
- ``finetune_run``: `mechhi finetune`, which writes the adapter directory.

>>> result = finetune(FinetuneConfig(store="stores/toy.zarr", select="top-4"))  # doctest: +SKIP
>>> result.selection.layers, result.params["trainable_pct"]                     # doctest: +SKIP
"""

from mechhi.data.images import ImageCache
from mechhi.data.splits import load_split, split_of
from mechhi.finetune.depth import DEFAULT_BAND, depth_matched
from mechhi.finetune.finetune_run import (
    CHECKPOINT_DIR,
    LOG_FILE,
    SELECTION_FILE,
    FinetuneConfig,
    FinetuneResult,
    finetune,
    read_selection,
    resolve_dataset,
    resolve_model_id,
)
from mechhi.finetune.lora import (
    LoraSettings,
    attach_lora,
    lora_config,
    lora_layers_of,
    lora_module_names,
    lora_norms,
    parameter_counts,
    quiet_peft,
)
from mechhi.finetune.loss import answer_labels, answer_loss
from mechhi.finetune.order import epoch_order, micro_batch, rank_part
from mechhi.finetune.select import (
    Selection,
    SelectionError,
    head_impact_fingerprint,
    parse_spec,
    select_layers,
    traced_samples,
)
from mechhi.finetune.train import History, TrainSettings, train_lora
from mechhi.finetune.training_data import FinetuneData, ensure_toy_dataset, prepare_samples
from mechhi.finetune.validate import validation_loss

__all__ = [
    "CHECKPOINT_DIR",
    "DEFAULT_BAND",
    "LOG_FILE",
    "SELECTION_FILE",
    "FinetuneConfig",
    "FinetuneData",
    "FinetuneResult",
    "History",
    "ImageCache",
    "LoraSettings",
    "Selection",
    "SelectionError",
    "TrainSettings",
    "answer_labels",
    "answer_loss",
    "attach_lora",
    "depth_matched",
    "ensure_toy_dataset",
    "epoch_order",
    "finetune",
    "head_impact_fingerprint",
    "load_split",
    "lora_config",
    "lora_layers_of",
    "lora_module_names",
    "lora_norms",
    "micro_batch",
    "parameter_counts",
    "parse_spec",
    "prepare_samples",
    "quiet_peft",
    "rank_part",
    "read_selection",
    "resolve_dataset",
    "resolve_model_id",
    "select_layers",
    "split_of",
    "traced_samples",
    "train_lora",
    "validation_loss",
]
