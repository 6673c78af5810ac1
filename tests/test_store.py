"""The zarr store: allocation, region writes, resume, open checks, scores, combine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from mechhi.store import (
    SCHEMA_VERSION,
    SampleMeta,
    StoreError,
    combine,
    create_store,
    depth_bins,
    done_mask,
    open_store,
    pad_grid,
    shard_samples,
    write_batch,
    write_scores,
)

L, H = 2, 3
GRIDS = [  # per sample: own (rows, cols) of the main view and of the "global" view
    {"image": (2, 3), "global": (2, 2)},
    {"image": (3, 2), "global": (2, 2)},
    {"image": (1, 1), "global": (1, 2)},
    {"image": (3, 3), "global": (2, 1)},
]
MAX = {"image": (3, 3), "global": (2, 2)}


def attrs(**over):
    base = {
        "model": "tiny/qwen",
        "model_revision": "abc123",
        "dtype": "float32",
        "prompt_template": "describe",
        "dataset": {"path": "data/toy", "fingerprint": "f00d"},
        "binarize": None,
    }
    return {**base, **over}


def metas(descriptions=("a red circle", "a blue square", "a star", "two shapes")):
    return [SampleMeta(f"img{i}", f"obj{i}", d, GRIDS[i]) for i, d in enumerate(descriptions)]


def own(sample: int, view: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample's own-grid data: attention (L, H, r, c) and mask (r, c), distinct per sample."""
    r, c = GRIDS[sample][view]
    rng = np.random.default_rng(seed * 100 + sample)
    return rng.random((L, H, r, c)).astype("float32"), rng.random((r, c)).astype("float32")


def batch(samples: list[int], seed: int = 0):
    """Padded batch arrays, as the tracer passes them."""
    att, mask = {}, {}
    for view in ("image", "global"):
        pairs = [own(s, view, seed) for s in samples]
        att[view] = np.stack([pad_grid(a, *MAX[view]) for a, _ in pairs])  # (b, L, H, R, C)
        mask[view] = np.stack([pad_grid(m, *MAX[view]) for _, m in pairs])  # (b, R, C)
    iou = np.stack([np.full((L, H), s / 10) for s in samples])
    return att, mask, iou


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "s.zarr"
    create_store(path, samples=metas(), n_layers=L, n_heads=H, attrs=attrs(), shard_samples=2)  # 2 shards
    return path


def test_pad_grid():
    out = pad_grid(np.array([[1.0, 2.0]]), 2, 3)
    np.testing.assert_array_equal(out, [[1.0, 2.0, np.nan], [np.nan, np.nan, np.nan]])
    with pytest.raises(StoreError, match="does not fit"):
        pad_grid(np.ones((3, 1)), 2, 3)


def test_create_allocates_coords_and_attrs(store: Path):
    ds = open_store(store)
    assert dict(ds.sizes) == {
        "sample": 4,
        "layer": L,
        "head": H,
        "row": 3,
        "col": 3,
        "row_global": 2,
        "col_global": 2,
    }
    assert ds["attention"].dims == ("sample", "layer", "head", "row", "col")
    assert ds["attention_global"].dims == ("sample", "layer", "head", "row_global", "col_global")
    assert ds["mask_global"].dims == ("sample", "row_global", "col_global")
    assert ds["attention"].chunks[0] == (1, 1, 1, 1)  # one sample per chunk: region writes are safe
    assert bool(np.isnan(ds["attention"].values).all()) and bool(np.isnan(ds["iou"].values).all())
    assert ds["iou"].dtype == np.float32 and ds["done"].dtype == bool
    np.testing.assert_array_equal(done_mask(store), [False] * 4)
    np.testing.assert_array_equal(ds["sample"], [0, 1, 2, 3])
    np.testing.assert_allclose(ds["depth"], [0.0, 1.0])
    assert list(ds["image_id"].values.astype(str)) == ["img0", "img1", "img2", "img3"]
    assert list(ds["object_id"].values.astype(str)) == ["obj0", "obj1", "obj2", "obj3"]
    assert ds["description"].values.astype(str)[1] == "a blue square"
    np.testing.assert_array_equal(ds["grid_rows"], [2, 3, 1, 3])
    np.testing.assert_array_equal(ds["grid_cols_global"], [2, 2, 2, 1])
    assert ds.attrs["schema_version"] == SCHEMA_VERSION
    assert ds.attrs["dataset"] == {"path": "data/toy", "fingerprint": "f00d"}
    for key in (
        "mechhi_version",
        "created",
        "model",
        "model_revision",
        "dtype",
        "prompt_template",
        "binarize",
    ):
        assert key in ds.attrs
    json.dumps(ds.attrs)


def test_create_single_layer_depth_and_no_maps(tmp_path: Path):
    path = tmp_path / "n.zarr"
    create_store(path, samples=metas(), n_layers=1, n_heads=H, attrs=attrs(), maps=False)
    ds = open_store(path)
    assert sorted(ds.data_vars) == ["done", "iou", "mask", "mask_global"]
    np.testing.assert_array_equal(ds["depth"], [0.0])


def test_create_rejects_missing_attrs_and_views(tmp_path: Path):
    with pytest.raises(StoreError, match="model_revision"):
        create_store(tmp_path / "a.zarr", samples=metas(), n_layers=L, n_heads=H, attrs={"model": "m"})
    bad = metas()[:1] + [SampleMeta("i", "o", "d", {"image": (1, 1)})]
    with pytest.raises(StoreError, match="sample 1 has views"):
        create_store(tmp_path / "b.zarr", samples=bad, n_layers=L, n_heads=H, attrs=attrs())


def test_write_batches_and_read_back(store: Path):
    att, mask, iou = batch([3, 1])  # non-contiguous, out of order
    write_batch(store, [3, 1], attention=att, mask=mask, iou=iou)
    np.testing.assert_array_equal(done_mask(store), [False, True, False, True])
    # Samples 1 and 3 live in shards 0 and 1 (2 samples each): one file per shard.
    written = sorted(int(p.name) for p in (store / "attention" / "c").iterdir())
    assert written == [0, 1]
    att0, mask0, iou0 = batch([0], seed=1)
    write_batch(store, [0], attention=att0, mask=mask0, iou=iou0)

    ds = open_store(store)
    np.testing.assert_array_equal(ds["done"].values, [True, True, False, True])
    for s, seed in ((0, 1), (1, 0), (3, 0)):
        for view, aname, mname in (
            ("image", "attention", "mask"),
            ("global", "attention_global", "mask_global"),
        ):
            a, m = own(s, view, seed)
            r, c = GRIDS[s][view]
            got_a = ds[aname].sel(sample=s).values  # (L, H, R, C)
            got_m = ds[mname].sel(sample=s).values
            np.testing.assert_array_equal(got_a[:, :, :r, :c], a)
            np.testing.assert_array_equal(got_m[:r, :c], m)
            # NaN outside the sample's own grid
            assert np.isnan(got_a[:, :, r:, :]).all() and np.isnan(got_a[:, :, :, c:]).all()
            assert np.isnan(got_m[r:, :]).all() and np.isnan(got_m[:, c:]).all()
        np.testing.assert_allclose(ds["iou"].sel(sample=s).values, s / 10)
    assert np.isnan(ds["attention"].sel(sample=2).values).all()  # never written
    assert np.isnan(ds["iou"].sel(sample=2).values).all()


def test_write_batch_validates(store: Path):
    att, mask, _ = batch([0, 1])
    with pytest.raises(StoreError, match="shape"):
        write_batch(store, [0, 1], attention={**att, "image": att["image"][:, :, :, :2]}, mask=mask)
    with pytest.raises(StoreError, match="distinct indices"):
        write_batch(store, [0, 7], attention=att, mask=mask)
    with pytest.raises(StoreError, match="attention maps"):
        write_batch(store, [0, 1], attention=None, mask=mask)
    with pytest.raises(StoreError, match="mask views"):
        write_batch(store, [0, 1], attention=att, mask={"image": mask["image"]})
    assert not done_mask(store).any()


def test_create_resumes_compatible_store(store: Path):
    att, mask, iou = batch([2])
    write_batch(store, [2], attention=att, mask=mask, iou=iou)
    created = open_store(store).attrs["created"]
    create_store(store, samples=metas(), n_layers=L, n_heads=H, attrs=attrs(prompt="another rendering"))
    ds = open_store(store)
    np.testing.assert_array_equal(ds["done"].values, [False, False, True, False])
    np.testing.assert_array_equal(ds["mask"].sel(sample=2).values[:1, :1], own(2, "image", 0)[1])
    assert ds.attrs["created"] == created


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attrs": attrs(model="other/model")}, "model"),
        ({"attrs": attrs(model_revision="other")}, "model_revision"),
        ({"attrs": attrs(dataset={"path": "data/toy", "fingerprint": "beef"})}, "dataset"),
        ({"attrs": attrs(dtype="bfloat16")}, "dtype"),
        ({"n_layers": 5}, "n_layers"),
        ({"n_heads": 1}, "n_heads"),
        ({"samples": metas(("a red circle", "CHANGED", "a star", "two shapes"))}, "description of sample 1"),
        ({"samples": metas()[:3]}, "n_samples"),
        ({"maps": False}, "variables"),
        (
            {
                "samples": [
                    SampleMeta(m.image_id, m.object_id, m.description, {**m.grids, "image": (4, 4)})
                    for m in metas()
                ]
            },
            "grid dim 'row'",
        ),
    ],
)
def test_create_rejects_incompatible_store(store: Path, kwargs, message):
    args = {"samples": metas(), "n_layers": L, "n_heads": H, "attrs": attrs(), **kwargs}
    with pytest.raises(StoreError, match=message):
        create_store(store, **args)


def test_open_store_errors(tmp_path: Path, store: Path):
    with pytest.raises(StoreError, match="no store"):
        open_store(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(StoreError, match="not a mechhi store"):
        open_store(tmp_path / "plain.zarr")
    zarr.open_group(str(store), mode="r+").attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="upgrade mechhi"):
        open_store(store)


def test_write_scores_overwrites_and_merges_attrs(store: Path):
    iou = xr.DataArray(np.arange(4 * L * H, dtype=float).reshape(4, L, H), dims=("sample", "layer", "head"))
    hi = xr.DataArray(np.arange(L * H, dtype=float).reshape(L, H) / 10, dims=("layer", "head"))
    write_scores(
        store, xr.Dataset({"iou": iou, "head_impact": hi}, attrs={"binarize": {"mask_threshold": 0.5}})
    )
    ds = open_store(store)
    np.testing.assert_allclose(ds["iou"].values, iou.values)
    np.testing.assert_allclose(ds["head_impact"].values, hi.values)
    assert ds.attrs["binarize"] == {"mask_threshold": 0.5} and ds.attrs["model"] == "tiny/qwen"
    # laid out as the traced iou: one chunk per shard of samples (store.layout.per_sample_chunks)
    assert ds["iou"].chunks[0] == (shard_samples(store),) * (4 // shard_samples(store))
    with pytest.raises(StoreError, match="size"):
        write_scores(store, xr.Dataset({"head_impact": hi.isel(head=[0])}))
    with pytest.raises(StoreError, match="traced variables"):
        write_scores(store, xr.Dataset({"done": ("sample", np.ones(4, bool))}))


def scored_store(path: Path, model: str, n_layers: int, n_heads: int, hi: np.ndarray) -> Path:
    create_store(path, samples=metas(), n_layers=n_layers, n_heads=n_heads, attrs=attrs(model=model))
    write_scores(path, xr.Dataset({"head_impact": (("layer", "head"), hi)}))
    return path


def test_combine_exact_outer_joins_float_depths(tmp_path: Path):
    hi3 = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])  # depths 0, 0.5, 1; heads 0, 1
    hi5 = np.arange(15, dtype=float).reshape(5, 3) / 100  # depths 0, .25, .5, .75, 1; heads 0..2
    a = scored_store(tmp_path / "a.zarr", "small", 3, 2, hi3)
    b = scored_store(tmp_path / "b.zarr", "big", 5, 3, hi5)
    got = combine([a, b], align="exact")
    nan = np.nan
    expected = xr.Dataset(
        {
            "head_impact": (
                ("model", "depth", "head"),
                [
                    [[0.1, 0.2, nan], [nan, nan, nan], [0.3, 0.4, nan], [nan, nan, nan], [0.5, 0.6, nan]],
                    [
                        [0.00, 0.01, 0.02],
                        [0.03, 0.04, 0.05],
                        [0.06, 0.07, 0.08],
                        [0.09, 0.10, 0.11],
                        [0.12, 0.13, 0.14],
                    ],
                ],
            )
        },
        coords={
            "model": ["small", "big"],
            "depth": [0.0, 0.25, 0.5, 0.75, 1.0],
            "head": [0, 1, 2],
            "layer": (("model", "depth"), [[0, nan, 1, nan, 2], [0, 1, 2, 3, 4]]),
        },
    )
    xr.testing.assert_allclose(got.transpose("model", "depth", "head").compute(), expected)


def ragged_stores(tmp_path: Path) -> tuple[list[Path], list[np.ndarray]]:
    """Three models with non-nested depths (4, 7, 12 layers) and 2, 3, 2 heads."""
    rng = np.random.default_rng(7)
    shapes = [("a", 4, 2), ("b", 7, 3), ("a", 12, 2)]
    his = [rng.random((n, h)) for _, n, h in shapes]
    his[1][0, 0] = np.nan  # an unscored head: skipped when its bin is averaged
    paths = [
        scored_store(tmp_path / f"{i}.zarr", m, n, h, hi)
        for i, ((m, n, h), hi) in enumerate(zip(shapes, his))
    ]
    return paths, his


def expected_bins(his: list[np.ndarray], members: list[dict[int, list[int]]], bins: int) -> np.ndarray:
    """(model, depth, head) by hand: nan-mean of the listed layers of each model per bin."""
    out = np.full((len(his), bins, 3), np.nan)
    for m, (hi, bins_of) in enumerate(zip(his, members)):
        for k, layers in bins_of.items():
            out[m, k, : hi.shape[1]] = np.nanmean(hi[layers], axis=0)
    return out


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # model b's only bin-0 layer is NaN on head 0
def test_combine_bins_depths_of_different_models(tmp_path: Path):
    paths, his = ragged_stores(tmp_path)
    got = combine(paths).transpose("model", "depth", "head").compute()
    # default bins = 12; bin k = [k/12, (k+1)/12), depth 1 in the last. 4 layers:
    # depths 0, 1/3, 2/3, 1 -> bins 0, 4, 8, 11; 7 layers: l/6 -> 0, 2, 4, 6, 8, 10, 11.
    members = [
        {0: [0], 4: [1], 8: [2], 11: [3]},
        {0: [0], 2: [1], 4: [2], 6: [3], 8: [4], 10: [5], 11: [6]},
        {k: [k] for k in range(12)},
    ]
    assert list(got["model"].values) == ["a (0)", "b", "a (2)"]  # model a twice: told apart by the file stem
    np.testing.assert_allclose(got["depth"].values, np.arange(0.5, 12) / 12)
    np.testing.assert_array_equal(got["head"].values, [0, 1, 2])
    np.testing.assert_allclose(got["head_impact"].values, expected_bins(his, members, 12))
    assert not got["head_impact"].isnull().all(("depth", "head")).any()  # no all-NaN model row
    layer = np.full((3, 12), np.nan)
    for m, bins_of in enumerate(members):
        for k, (only,) in bins_of.items():
            layer[m, k] = only
    np.testing.assert_array_equal(got["layer"].values, layer)
    np.testing.assert_array_equal(got["layer_count"].values, ~np.isnan(layer))
    assert got.attrs["align"] == "depth" and got.attrs["bins"] == 12


def test_combine_bins_average_layers_sharing_a_bin(tmp_path: Path):
    paths, his = ragged_stores(tmp_path)
    got = combine(paths, bins=4).transpose("model", "depth", "head").compute()
    # bins [0, .25), [.25, .5), [.5, .75), [.75, 1]; 7 layers at l/6, 12 layers at l/11.
    members = [
        {0: [0], 1: [1], 2: [2], 3: [3]},
        {0: [0, 1], 1: [2], 2: [3, 4], 3: [5, 6]},
        {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8], 3: [9, 10, 11]},
    ]
    np.testing.assert_allclose(got["depth"].values, [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(got["head_impact"].values, expected_bins(his, members, 4))
    assert got["head_impact"].sel(model="b", head=0).values[0] == his[1][1, 0]  # NaN layer 0 skipped
    np.testing.assert_array_equal(got["layer_count"].values, [[1, 1, 1, 1], [2, 1, 2, 2], [3, 3, 3, 3]])
    nan = np.nan
    np.testing.assert_array_equal(got["layer"].values, [[0, 1, 2, 3], [nan, 2, nan, nan], [nan] * 4])


def test_combine_equal_depths_keep_exact_depths(tmp_path: Path):
    a = scored_store(tmp_path / "a.zarr", "m1", 3, 2, np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    b = scored_store(tmp_path / "b.zarr", "m2", 3, 1, np.array([[7.0], [8.0], [9.0]]))
    nan = np.nan
    expected = xr.Dataset(
        {
            "head_impact": (
                ("model", "depth", "head"),
                [[[1, 2], [3, 4], [5, 6]], [[7, nan], [8, nan], [9, nan]]],
            )
        },
        coords={
            "model": ["m1", "m2"],
            "depth": [0.0, 0.5, 1.0],
            "head": [0, 1],
            "layer": (("model", "depth"), [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]),
        },
    )
    for align in ("depth", "exact"):
        got = combine([a, b], align=align)
        xr.testing.assert_allclose(got.transpose("model", "depth", "head").compute(), expected)
        assert got.attrs["align"] == "exact"


def test_combine_aligns_on_layer_index(tmp_path: Path):
    hi3 = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    hi5 = np.arange(15, dtype=float).reshape(5, 3) / 100
    a = scored_store(tmp_path / "a.zarr", "small", 3, 2, hi3)
    b = scored_store(tmp_path / "b.zarr", "big", 5, 3, hi5)
    got = combine([a, b], align="layer").transpose("model", "layer", "head").compute()
    nan = np.nan
    small = np.full((5, 3), nan)
    small[:3, :2] = hi3
    expected = xr.Dataset(
        {"head_impact": (("model", "layer", "head"), np.stack([small, hi5]))},
        coords={
            "model": ["small", "big"],
            "layer": [0, 1, 2, 3, 4],
            "head": [0, 1, 2],
            "depth": (("model", "layer"), [[0, 0.5, 1, nan, nan], [0, 0.25, 0.5, 0.75, 1]]),
        },
    )
    xr.testing.assert_allclose(got, expected)


def test_depth_bins_is_exact_on_bin_edges():
    # layer 13 of 24 has depth 13/23, exactly the start of bin 13 of 23; float
    # floor(13 / 23 * 23) gives 12.
    assert depth_bins(24, 23)[13] == 13
    np.testing.assert_array_equal(depth_bins(4, 12), [0, 4, 8, 11])
    np.testing.assert_array_equal(depth_bins(1, 5), [0])  # a single layer has depth 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"align": "depths"}, "unknown align='depths'"),
        ({"align": "exact", "bins": 4}, "only applies to align='depth'"),
        ({"bins": 0}, "positive int"),
        ({"bins": 2.5}, "positive int"),
        ({"variables": ("done",)}, "'done' of store .* has no 'layer' dim"),
    ],
)
def test_combine_rejects_bad_options(tmp_path: Path, kwargs, message):
    a = scored_store(tmp_path / "a.zarr", "m", 2, 1, np.ones((2, 1)))
    with pytest.raises(StoreError, match=message):
        combine([a, a], **kwargs)


def test_combine_makes_model_labels_unique_and_needs_scores(tmp_path: Path):
    a = scored_store(tmp_path / "a.zarr", "same", 2, 1, np.ones((2, 1)))
    b = scored_store(tmp_path / "b.zarr", "same", 2, 1, np.zeros((2, 1)))
    assert list(combine([a, b])["model"].values) == ["same (a)", "same (b)"]
    assert list(combine([a, a])["model"].values) == ["same", "same#2"]  # one store twice
    c = tmp_path / "c.zarr"
    create_store(c, samples=metas(), n_layers=2, n_heads=1, attrs=attrs())
    with pytest.raises(StoreError, match="no head_impact"):
        combine([a, c])


def test_combine_default_labels_are_short_and_say_what_differs(tmp_path: Path):
    """Labels name the model by its last path component, not the path plus "#2"; stores of one
    model differ by template or dataset, and the label says which."""
    hi = np.ones((2, 1))
    create_store(
        tmp_path / "d.zarr",
        samples=metas(),
        n_layers=2,
        n_heads=1,
        attrs=attrs(model="mechhi/zoo/toy-qwen2vl", prompt_template="describe"),
    )
    write_scores(tmp_path / "d.zarr", xr.Dataset({"head_impact": (("layer", "head"), hi)}))
    create_store(
        tmp_path / "v.zarr",
        samples=metas(),
        n_layers=2,
        n_heads=1,
        attrs=attrs(model="mechhi/zoo/toy-qwen2vl", prompt_template="vqa"),
    )
    write_scores(tmp_path / "v.zarr", xr.Dataset({"head_impact": (("layer", "head"), hi)}))
    other = scored_store(tmp_path / "o.zarr", "/abs/models/smollm2", 2, 1, hi)
    got = combine([tmp_path / "d.zarr", tmp_path / "v.zarr", other])
    assert list(got["model"].values) == ["toy-qwen2vl (describe)", "toy-qwen2vl (vqa)", "smollm2"]


def test_combine_takes_the_users_labels(tmp_path: Path):
    a = scored_store(tmp_path / "a.zarr", "/m/one", 2, 1, np.array([[0.1], [0.2]]))
    b = scored_store(tmp_path / "b.zarr", "/m/two", 3, 1, np.array([[0.3], [0.4], [0.5]]))
    by_mapping = combine({"smollm2": a, "gemma3": b})
    assert list(by_mapping["model"].values) == ["smollm2", "gemma3"]
    np.testing.assert_allclose(
        by_mapping["head_impact"].sel(model="gemma3", head=0).values[[0, -1]], [0.3, 0.5]
    )
    by_keyword = combine([a, b], labels=["x", "y"], align="layer")
    assert list(by_keyword["model"].values) == ["x", "y"]
    np.testing.assert_allclose(by_keyword["head_impact"].sel(model="x", head=0).values[:2], [0.1, 0.2])
    for kwargs, message in [
        ({"labels": ["x"]}, "1 given for 2 stores"),
        ({"labels": ["x", "x"]}, "'x' given to more"),
        ({"labels": ["x", ""]}, "not a label"),
    ]:
        with pytest.raises(StoreError, match=message):
            combine([a, b], **kwargs)
    with pytest.raises(StoreError, match="not both"):
        combine({"p": a, "q": b}, labels=["x", "y"])


def test_kill_during_creation_leaves_no_half_store(tmp_path, monkeypatch):
    """Creation is staged and renamed: an interrupted create leaves nothing at the path."""
    import xarray as xr

    from mechhi.store import SampleMeta, create_store

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_zarr", boom)
    meta = [SampleMeta("a", "0", "a red circle", {"image": (2, 2)})]
    attrs = {
        "model": "m",
        "model_revision": "",
        "dtype": "float32",
        "prompt_template": "caption",
        "dataset": "d",
    }
    target = tmp_path / "s.zarr"
    with pytest.raises(KeyboardInterrupt):
        create_store(target, samples=meta, n_layers=2, n_heads=2, attrs=attrs)
    assert not target.exists()
    monkeypatch.undo()
    create_store(target, samples=meta, n_layers=2, n_heads=2, attrs=attrs)  # a rerun creates it cleanly
    assert target.exists()


# --------------------------------------------------------- concurrent creation and writers (issue 10, item 2)
def test_a_creator_that_loses_the_race_keeps_the_winners_store(tmp_path: Path, monkeypatch):
    """Another process creates the store while this one writes its staging copy: both
    finish, with one store, and no staging copy is left."""
    target = tmp_path / "s.zarr"
    real = xr.Dataset.to_zarr

    def racing(self, store, *args, **kwargs):
        out = real(self, store, *args, **kwargs)
        if ".creating." in str(store) and not target.exists():
            monkeypatch.setattr(xr.Dataset, "to_zarr", real)
            assert create_store(target, samples=metas(), n_layers=L, n_heads=H, attrs=attrs())  # the winner
        return out

    monkeypatch.setattr(xr.Dataset, "to_zarr", racing)
    assert create_store(target, samples=metas(), n_layers=L, n_heads=H, attrs=attrs()) is False  # the loser
    assert open_store(target).sizes["sample"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def _create_in_child(target: str, barrier) -> None:
    barrier.wait()
    create_store(target, samples=metas(), n_layers=L, n_heads=H, attrs=attrs())


@pytest.mark.slow  # spawned interpreters import xarray and zarr: about 20 s per attempt on 2 cores
def test_processes_creating_one_store_at_once_all_succeed(tmp_path: Path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork would copy zarr's event-loop thread's locks
    for attempt in range(3):
        target = tmp_path / f"s{attempt}.zarr"
        barrier = context.Barrier(3)
        children = [context.Process(target=_create_in_child, args=(str(target), barrier)) for _ in range(3)]
        for child in children:
            child.start()
        for child in children:
            child.join(120)
        assert [child.exitcode for child in children] == [0, 0, 0]
        assert open_store(target).sizes["sample"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.zarr", "s1.zarr", "s2.zarr"]


def test_leftovers_of_killed_creators_are_cleaned_up(tmp_path: Path):
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    target = tmp_path / "s.zarr"
    target.mkdir()  # an empty directory, as an interrupted older mechhi left it
    (tmp_path / ".s.zarr.creating").mkdir()  # older mechhi's single staging name
    (tmp_path / f".s.zarr.creating.{socket.gethostname()}.{gone.pid}.abcd1234").mkdir()
    (tmp_path / ".s.zarr.creating.otherhost.1.abcd1234").mkdir()  # another host's: not ours to judge
    assert create_store(target, samples=metas(), n_layers=L, n_heads=H, attrs=attrs())
    assert open_store(target).sizes["sample"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.zarr.creating.otherhost.1.abcd1234", "s.zarr"]


def test_writer_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path):
    import os
    import socket

    from mechhi.store import StoreLocked, WriterLock, lock_path

    store = tmp_path / "s.zarr"
    with WriterLock(store):
        assert lock_path(store).read_text().splitlines()[:2] == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(StoreLocked, match=f"being written by pid {os.getpid()} on host"):
            WriterLock(store).acquire()
    assert not lock_path(store).exists()
    lock_path(store).write_text("1\nelsewhere\n")  # a holder on another host cannot be probed
    with pytest.raises(StoreLocked, match="if that process is gone, delete"):
        WriterLock(store).acquire()


# ---------------------------------------------------------------- probe scores are not the run (item 1)
def test_probe_scores_do_not_make_a_store_incompatible(store: Path):
    hi = xr.DataArray(np.ones((L, H)), dims=("layer", "head"))
    write_scores(store, xr.Dataset({"head_impact": hi, "object_lift": hi * 2}))
    assert create_store(store, samples=metas(), n_layers=L, n_heads=H, attrs=attrs()) is False  # resumes
    with pytest.raises(StoreError, match="names of traced variables"):
        write_scores(store, xr.Dataset({"attention_mean": hi}))  # would read as a traced variable


# ------------------------------------------------------------ lost data (item 5) and damaged stores (item 12)
def test_missing_data_names_done_samples_without_their_chunks(store: Path):
    from mechhi.store import damaged_samples, missing_data

    att, mask, iou = batch([0, 1, 2])
    write_batch(store, [0, 1, 2], attention=att, mask=mask, iou=iou)
    assert missing_data(store) == []
    (store / "mask" / "c" / "0" / "0" / "0").unlink()  # shard 0: samples 0 and 1
    (store / "attention_global" / "c" / "1" / "0" / "0" / "0" / "0").unlink()  # shard 1: 2 (done), 3 (not)
    assert [(d.sample, d.variable) for d in missing_data(store)] == [
        (0, "mask"),
        (1, "mask"),
        (2, "attention_global"),
    ]
    (store / "iou" / "c" / "0" / "0" / "0").write_bytes(b"garbage")  # no shard index: found without decoding
    found = missing_data(store)
    assert [(d.sample, d.variable, d.kind) for d in found] == [
        (0, "iou", "damaged"),
        (0, "mask", "missing"),
        (1, "iou", "damaged"),
        (1, "mask", "missing"),
        (2, "attention_global", "missing"),
    ]
    # the index of iou's one inner chunk per shard: 16 bytes of offset and length, a 4-byte crc32c
    assert "shard damaged (iou/c/0/0/0: 7 bytes, shorter than its 20-byte index" in found[0].problem
    assert damaged_samples(store, deep=True) == found


def test_an_all_nan_iou_of_a_done_sample_is_still_on_disk(store: Path):
    from mechhi.store import missing_data

    att, mask, _ = batch([0])
    write_batch(store, [0], attention=att, mask=mask, iou=np.full((1, L, H), np.nan))
    assert (store / "iou" / "c" / "0" / "0" / "0").is_file() and missing_data(store) == []


def test_a_store_without_done_is_reported_as_damaged(store: Path):
    import shutil

    shutil.rmtree(store / "done")
    with pytest.raises(StoreError, match="damaged mechhi store: it has no 'done' variable"):
        open_store(store)


def test_a_store_from_before_sharding_still_reads_resumes_and_verifies(tmp_path: Path, monkeypatch):
    """Stores written before sharding keep one chunk file per sample: they open, take
    writes, find lost chunks and count as one-sample shards (so ranks can share them)."""
    from mechhi.store import create, missing_data, shard_samples

    monkeypatch.setattr(create, "sharded", lambda ds, shard: {})  # the old layout: plain 1-sample chunks
    path = tmp_path / "old.zarr"
    create_store(path, samples=metas(), n_layers=L, n_heads=H, attrs=attrs(), shard_samples=1)
    monkeypatch.undo()
    assert zarr.open_array(str(path / "attention"), mode="r").shards is None
    assert shard_samples(path) == 1
    att, mask, iou = batch([0, 2])
    write_batch(path, [0, 2], attention=att, mask=mask, iou=iou)
    assert sorted(int(p.name) for p in (path / "attention" / "c").iterdir()) == [0, 2]
    (path / "mask" / "c" / "2" / "0" / "0").unlink()
    assert [(d.sample, d.variable) for d in missing_data(path)] == [(2, "mask")]
    np.testing.assert_array_equal(
        open_store(path)["attention"].isel(sample=0).values[..., :2, :3], own(0, "image", 0)[0]
    )


def test_a_store_from_before_checksums_still_reads_resumes_and_verifies(tmp_path: Path, monkeypatch):
    """Sharded stores written before chunks carried a crc32c: they open, take writes, find
    lost and truncated shards, and say that their chunks cannot be checked."""
    from mechhi.store import create, damaged_samples, missing_data, unchecked
    from mechhi.store.layout import checksummed, sharded

    monkeypatch.setattr(create, "sharded", lambda ds, shard: sharded(ds, shard, checksum=False))
    path = tmp_path / "old.zarr"
    create_store(path, samples=metas(), n_layers=L, n_heads=H, attrs=attrs(), shard_samples=2)
    monkeypatch.undo()
    assert not checksummed(zarr.open_array(str(path / "attention"), mode="r"))
    assert sorted(unchecked(path)) == ["attention", "attention_global", "done", "iou", "mask", "mask_global"]
    att, mask, iou = batch([0, 1, 2])
    write_batch(path, [0, 1, 2], attention=att, mask=mask, iou=iou)
    assert damaged_samples(path, deep=True) == []
    shard = path / "mask" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-3])  # the index at the end loses its last bytes
    assert [(d.sample, d.variable, d.kind) for d in missing_data(path)] == [
        (0, "mask", "damaged"),
        (1, "mask", "damaged"),
    ]
    from tests.helpers import invoke

    text = invoke(["store", "verify", path], exit_code=1).stdout
    assert "lost sample 0: mask shard damaged (mask/c/0/0/0: index unreadable" in text
    assert "carry no checksum" in text
    np.testing.assert_array_equal(
        open_store(path)["attention"].isel(sample=2).values[..., :1, :1], own(2, "image", 0)[0]
    )


def test_a_new_store_checksums_its_chunks_and_a_flipped_byte_fails_to_read(store: Path):
    from mechhi.store import damaged_samples, unchecked

    assert unchecked(store) == []
    att, mask, iou = batch([0, 1])
    write_batch(store, [0, 1], attention=att, mask=mask, iou=iou)
    shard = store / "mask" / "c" / "0" / "0" / "0"  # a map: one inner chunk per sample
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF  # inside sample 0's inner chunk (the index is at the end)
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum do not match"):
        open_store(store)["mask"].values
    found = damaged_samples(store, deep=True)
    assert [(d.sample, d.variable, d.file, d.kind) for d in found] == [
        (0, "mask", "mask/c/0/0/0", "unreadable")
    ]
    iou_shard = store / "iou" / "c" / "0" / "0" / "0"  # a small variable: one inner chunk per shard
    data = bytearray(iou_shard.read_bytes())
    data[5] ^= 0xFF
    iou_shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum do not match"):
        open_store(store)["iou"].values
    found = damaged_samples(store, deep=True)
    assert [(d.sample, d.variable, d.kind) for d in found if d.variable == "iou"] == [
        (0, "iou", "unreadable"),
        (1, "iou", "unreadable"),
    ]
