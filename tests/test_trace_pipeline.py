"""The trace's pipeline (issue 13, items 3 and 6): length-bucketed batches prepared by
DataLoader workers, the background store writer, and models placed by a device map.

References are independent of the code under test: the unpadded trace (batch size 1)
for bucketed batches, a plain loop for the bucket order, the in-process loader for the
workers, the plainly loaded model for a dispatched one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import xarray as xr

from mechhi.store import open_store
from mechhi.trace import loader
from mechhi.trace.trace_dataset import TraceConfig, trace_dataset
from mechhi.trace.writer import BackgroundWriter
from tests.helpers import invoke, one_line_error
from tests.toy_dataset import write_toy_dataset

TRACED = ("attention", "mask", "iou", "done")


def trace(model_dir, data, store, **kw):
    defaults = {"batch_size": 3, "device": "cpu", "dtype": "float32", "num_workers": 0}
    return open_store(
        trace_dataset(
            TraceConfig(model=str(model_dir), dataset=str(data), store=str(store), **{**defaults, **kw}),
            progress=False,
        )
    ).load()


# ---------------------------------------------------------------- bucketing
def test_bucketed_batches_sort_by_bucket_then_index():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 400, 50)
    pending = sorted(rng.choice(50, 37, replace=False).tolist())
    batches = loader.bucketed_batches(pending, lengths, 4, bucket_tokens=64)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == pending and all(len(b) == 4 for b in batches[:-1])
    expected = []  # bucket by bucket, each in index order
    for bucket in range(-(-400 // 64) + 1):
        expected += [i for i in pending if (lengths[i] + 63) // 64 == bucket]
    assert flat == expected


def test_bucketed_batches_pad_less_than_dataset_order():
    lengths = np.array([500, 20, 480, 30, 510, 25, 490, 35])

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in map(np.array, batches))

    bucketed = loader.bucketed_batches(range(8), lengths, 2)
    assert padding(bucketed) < padding([[0, 1], [2, 3], [4, 5], [6, 7]]) / 10


def test_bucketed_trace_equals_the_unpadded_trace(tiny_model_dir, dataset_dir, tmp_path, monkeypatch):
    """Buckets one token wide reorder the batches (image sizes differ); each sample's
    numbers must still be those of the trace without any padding (batch size 1)."""
    reference = trace(tiny_model_dir, dataset_dir, tmp_path / "one.zarr", batch_size=1)
    monkeypatch.setattr(loader, "BUCKET_TOKENS", 1)
    order = []
    store = tmp_path / "bucketed.zarr"
    trace_dataset(
        TraceConfig(
            model=str(tiny_model_dir),
            dataset=str(dataset_dir),
            store=str(store),
            batch_size=3,
            device="cpu",
            dtype="float32",
            num_workers=1,
        ),
        progress=False,
        on_batch=lambda n, idx: order.append(list(idx)),
    )
    flat = [i for batch in order for i in batch]
    assert sorted(flat) == list(range(10)) and flat != sorted(flat), "the buckets must reorder the samples"
    bucketed = open_store(store).load()
    assert bool(bucketed.done.all())
    for name in ("attention", "mask", "iou"):
        xr.testing.assert_allclose(bucketed[name], reference[name], atol=1e-5, rtol=1e-4)


def test_workers_make_the_in_process_store(tiny_model_dir, dataset_dir, tmp_path):
    serial = trace(tiny_model_dir, dataset_dir, tmp_path / "serial.zarr", num_workers=0)
    workers = trace(tiny_model_dir, dataset_dir, tmp_path / "workers.zarr", num_workers=2)
    for name in TRACED:
        xr.testing.assert_identical(serial[name], workers[name])


def test_a_bad_image_in_a_worker_is_one_line_naming_it(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    write_toy_dataset(data, n_images=3)
    image = sorted((data / "images").iterdir())[1]
    image.write_bytes(image.read_bytes()[:60])  # truncated after the header: decoding fails
    result = invoke(
        [
            "trace",
            "--model",
            tiny_model_dir,
            "--dataset",
            data,
            "--store",
            tmp_path / "s.zarr",
            "--device",
            "cpu",
            "--num-workers",
            "1",
        ],
        exit_code=1,
    )
    line = one_line_error(result)
    assert "img001" in line and "DataLoader" not in line


# ---------------------------------------------------------------- the writer thread
def test_the_writer_keeps_at_most_two_batches_and_their_order():
    written, alive, peak = [], [0], [0]
    lock = threading.Lock()

    def write(item):
        time.sleep(0.02)  # a slow disk: the producer must wait, not pile up
        with lock:
            written.append(item)
            alive[0] -= 1

    with BackgroundWriter(write, depth=2) as writer:
        for item in range(12):
            writer.reserve()
            with lock:  # the batch now exists
                alive[0] += 1
                peak[0] = max(peak[0], alive[0])
            writer.submit(item)
    assert written == list(range(12)) and peak[0] == 2


def test_a_write_error_stops_the_writer_and_reaches_the_caller():
    written = []

    def write(item):
        if item == 2:
            raise KeyError("disk full")
        written.append(item)

    with pytest.raises(KeyError, match="disk full"), BackgroundWriter(write, depth=2) as writer:
        for item in range(50):
            writer.reserve()
            writer.submit(item)
            time.sleep(0.005)
    assert written == [0, 1], "nothing after the failed batch is written"


def test_an_interrupt_in_the_forward_thread_still_writes_every_handed_over_batch():
    written = []

    def write(item):
        time.sleep(0.05)
        written.append(item)

    with pytest.raises(KeyboardInterrupt), BackgroundWriter(write, depth=2) as writer:
        for item in range(5):
            writer.reserve()
            writer.submit(item)
        raise KeyboardInterrupt
    assert written == list(range(5))


def test_a_kill_mid_trace_leaves_exactly_the_written_batches(tiny_model_dir, dataset_dir, tmp_path):
    """The writer runs on_batch after each batch's done flags; its exception stops the
    writer before the next batch, even though the forward has run ahead."""

    class Killed(Exception):
        pass

    def kill(number, indices):
        time.sleep(0.2)  # the forward thread gets ahead meanwhile
        if number == 0:
            raise Killed

    store = tmp_path / "s.zarr"
    with pytest.raises(Killed):
        trace_dataset(
            TraceConfig(
                model=str(tiny_model_dir),
                dataset=str(dataset_dir),
                store=str(store),
                batch_size=2,
                device="cpu",
                dtype="float32",
                num_workers=1,
            ),
            progress=False,
            on_batch=kill,
        )
    assert open_store(store).done.values.tolist() == [True, True] + [False] * 8


# ---------------------------------------------------------------- device maps (item 6)
def test_a_device_map_trace_equals_the_plain_trace(tiny_model_dir, dataset_dir, tmp_path):
    plain = trace(tiny_model_dir, dataset_dir, tmp_path / "plain.zarr")
    mapped = trace(tiny_model_dir, dataset_dir, tmp_path / "mapped.zarr", device="auto", device_map="auto")
    for name in TRACED:
        xr.testing.assert_allclose(plain[name], mapped[name], atol=1e-6)


def test_an_accelerate_dispatched_model_traces_the_same(tiny_model_dir, dataset_dir, tmp_path):
    """accelerate's hooks on every module (what a multi-GPU split installs) under nnsight."""
    from accelerate import dispatch_model

    from mechhi.models.loading import load

    plain = trace(tiny_model_dir, dataset_dir, tmp_path / "plain.zarr", limit=4)
    model, adapter = load(tiny_model_dir, device="cpu", dtype="float32")
    layers = adapter.n_layers
    device_map = {
        "model.visual": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "lm_head": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        **{f"model.language_model.layers.{i}": "cpu" for i in range(layers)},
    }
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    assert hasattr(model.model.language_model.layers[0], "_hf_hook")
    config = TraceConfig(
        model=str(tiny_model_dir),
        dataset=str(dataset_dir),
        store=str(tmp_path / "d.zarr"),
        batch_size=3,
        device="cpu",
        dtype="float32",
        num_workers=0,
        limit=4,
    )
    dispatched = open_store(trace_dataset(config, progress=False, loaded=(model, adapter))).load()
    for name in TRACED:
        xr.testing.assert_allclose(plain[name], dispatched[name], atol=1e-6)


@pytest.mark.parametrize("command", ["trace", "evaluate"])
def test_a_device_map_with_a_device_is_one_line(tiny_model_dir, tmp_path, command):
    result = invoke(
        [
            command,
            "--model",
            tiny_model_dir,
            "--device",
            "cpu",
            "--device-map",
            "auto",
            *(["--store", tmp_path / "s.zarr"] if command == "trace" else []),
        ],
        exit_code=1,
    )
    assert "drop --device cpu" in one_line_error(result)


def test_an_unknown_device_map_lists_the_choices(tiny_model_dir, tmp_path):
    result = invoke(
        ["trace", "--model", tiny_model_dir, "--device-map", "everywhere", "--store", tmp_path / "s.zarr"],
        exit_code=1,
    )
    assert "balanced_low_0" in one_line_error(result)


def test_bucketed_batches_stay_within_shards():
    """In a sharded store a batch holds samples of one shard (or of the fewest whole shards
    that hold a batch), bucketed by length inside it; every pending sample once."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 400, size=40)
    pending = [i for i in range(40) if i % 7]
    for shard, batch in ((8, 4), (8, 3), (2, 4)):
        batches = loader.bucketed_batches(pending, lengths, batch, shard_samples=shard)
        assert sorted(i for b in batches for i in b) == pending
        window = shard * -(-batch // shard)
        assert all(len({i // window for i in b}) == 1 and len(b) <= batch for b in batches)
        for b in batches:  # length buckets ascending within the window
            buckets = [-(-int(lengths[i]) // loader.BUCKET_TOKENS) for i in b]
            assert buckets == sorted(buckets)
