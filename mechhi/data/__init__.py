"""Key-object datasets: the on-disk format (`format`) and its sources.

Everything a consumer needs is re-exported here::

    from mechhi.data import load_dataset, DatasetWriter, Sample
"""

from mechhi.data.format import (
    ANNOTATIONS,
    SPLITS,
    DatasetError,
    DatasetWriter,
    ImageProblem,
    ImageRecord,
    KeyObject,
    KeyObjectDataset,
    Sample,
    Skipped,
    check_dataset,
    decode_mask,
    encode_mask,
    image_size,
    load_dataset,
    open_image,
    record_to_json,
)

__all__ = [
    "ANNOTATIONS",
    "SPLITS",
    "DatasetError",
    "DatasetWriter",
    "ImageProblem",
    "ImageRecord",
    "KeyObject",
    "KeyObjectDataset",
    "Sample",
    "Skipped",
    "check_dataset",
    "decode_mask",
    "encode_mask",
    "image_size",
    "load_dataset",
    "open_image",
    "record_to_json",
]
