"""Two-view sampler: crops match the cache, augmentation statistics, determinism, workers, DDP sharding."""

from __future__ import annotations

import itertools
import json
import pickle

import numpy as np
import pytest
import torch

from dagman.data.cache import MANIFEST, cache_entries, open_volume
from dagman.data.views import EpochBatchSampler, TwoViewDataset, make_synthetic_cache, two_view_loader
from dagman.errors import ConfigError, DataError

SHAPES = [(20, 24, 28), (30, 18, 22), (19, 21, 17)]
CROP = 16
NO_AUG = dict(flip_prob=0.0, intensity_scale=None, intensity_shift=None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("cache"), len(SHAPES), SHAPES, seed=3)


@pytest.fixture(scope="module")
def volumes(cache):
    return [np.asarray(open_volume(cache, e), dtype=np.float32) for e in cache_entries(cache)]


def crop_at(volume: np.ndarray, origin, size=CROP) -> np.ndarray:
    x, y, z = (int(o) for o in origin)
    return volume[x : x + size, y : y + size, z : z + size]


def test_synthetic_cache_follows_the_cache_contract(cache):
    entries = cache_entries(cache)
    assert [e.shape for e in entries] == SHAPES
    for e in entries:
        vol = open_volume(cache, e)
        assert isinstance(vol, np.memmap) and vol.dtype == np.float16 and vol.shape == e.shape
        assert 0.0 <= float(vol.min()) and float(vol.max()) <= 1.0
        assert float(vol.std()) > 0.05  # noise: every crop is distinct
    assert json.loads((cache / MANIFEST).read_text())["settings"]["synthetic"] is True


def test_sample_shapes_dtypes_and_epoch_length(cache):
    ds = TwoViewDataset(cache, CROP, samples_per_volume=4)
    assert len(ds) == 3 * 4
    s = ds[5]
    assert set(s) == {"view1", "view2", "volume", "origin1", "origin2", "missing"}
    assert s["missing"] == -1
    for key in ("view1", "view2"):
        assert s[key].shape == (1, CROP, CROP, CROP) and s[key].dtype == torch.float32
    for key in ("origin1", "origin2"):
        assert s[key].shape == (3,) and s[key].dtype == torch.int64
    assert isinstance(s["volume"], int) and s["volume"] == 5 % 3
    # One epoch visits every volume samples_per_volume times.
    assert np.bincount([ds[i]["volume"] for i in range(len(ds))]).tolist() == [4, 4, 4]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_views_are_crops_of_the_same_volume_at_the_reported_origins(cache, volumes):
    ds = TwoViewDataset(cache, CROP, samples_per_volume=5, **NO_AUG)
    differing = 0
    for i in range(len(ds)):
        s = ds[i]
        vol = volumes[s["volume"]]
        for view, origin in (("view1", "origin1"), ("view2", "origin2")):
            o = s[origin].numpy()
            assert np.all(o >= 0) and np.all(o + CROP <= np.asarray(vol.shape))
            np.testing.assert_array_equal(s[view][0].numpy(), crop_at(vol, o))
        differing += not torch.equal(s["origin1"], s["origin2"])
    assert differing >= len(ds) - 1  # two independent crops, not the same one twice


def test_crop_origins_are_uniform_over_valid_positions(cache):
    ds = TwoViewDataset(cache, CROP, samples_per_volume=200, **NO_AUG)
    # Volume 2 is 19x21x17: valid origins per axis 0..3, 0..5, 0..1.
    origins = np.stack(
        [ds[i][k].numpy() for i in range(2, len(ds), 3) for k in ("origin1", "origin2")]
    )  # 400 crops of volume 2
    for axis, positions in enumerate((4, 6, 2)):
        counts = np.bincount(origins[:, axis], minlength=positions)
        assert len(counts) == positions  # never beyond the last valid origin
        expected = len(origins) / positions
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


def test_view_max_shift_keeps_view2_near_view1_and_inside_the_volume(cache, volumes):
    m = 2
    ds = TwoViewDataset(cache, CROP, samples_per_volume=60, view_max_shift=m, **NO_AUG)
    independent = TwoViewDataset(cache, CROP, samples_per_volume=60, **NO_AUG)
    shifts = []
    for i in range(len(ds)):
        s = ds[i]
        vol = volumes[s["volume"]]
        o1, o2 = s["origin1"].numpy(), s["origin2"].numpy()
        assert np.all(o2 >= 0) and np.all(o2 + CROP <= np.asarray(vol.shape))  # clipped to valid origins
        np.testing.assert_array_equal(s["view2"][0].numpy(), crop_at(vol, o2))
        shifts.append(o2 - o1)
        # view 1 is drawn exactly as without the option
        np.testing.assert_array_equal(s["view1"].numpy(), independent[i]["view1"].numpy())
    shifts = np.abs(np.stack(shifts))
    assert shifts.max() <= m
    assert (shifts > 0).mean() > 0.3  # shifted, not a copy of view 1
    # without the option the views of the large axis (volume 1: 30 voxels, 15 origins) move further apart
    far = [abs(int(independent[i]["origin2"][0] - independent[i]["origin1"][0])) for i in range(1, len(ds), 3)]
    assert max(far) > m


def test_view_max_shift_on_a_padded_axis_and_bad_values(tmp_path):
    cache = make_synthetic_cache(tmp_path / "c", 1, [(12, 20, 20)], seed=1)  # x shorter than the crop: padded
    ds = TwoViewDataset(cache, CROP, view_max_shift=1, samples_per_volume=30, **NO_AUG)
    for i in range(len(ds)):
        s = ds[i]
        o1, o2 = s["origin1"].numpy(), s["origin2"].numpy()
        assert -4 <= o2[0] <= 0 and np.all(np.abs(o2 - o1) <= 1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="view_max_shift"):
            TwoViewDataset(cache, CROP, view_max_shift=bad)


def _zero_planes(view: np.ndarray) -> np.ndarray:
    """Indices of the z planes of ``view`` (X, Y, Z) that are exactly 0 everywhere."""
    return np.flatnonzero(np.abs(view).reshape(-1, view.shape[-1]).max(axis=0) == 0)


def test_slab_keeps_a_contiguous_run_of_z_planes_of_the_drawn_thickness(cache, volumes):
    # Synthetic volumes are noise in (0, 1]: no plane of a plain crop is all zero, so every zero plane is the slab's.
    half = TwoViewDataset(cache, CROP, samples_per_volume=20, slab_prob=1.0, slab_fraction=(0.5, 0.5), **NO_AUG)
    plain = TwoViewDataset(cache, CROP, samples_per_volume=20, **NO_AUG)
    firsts = set()
    for i in range(len(half)):
        s, p = half[i], plain[i]
        for key in ("view1", "view2"):
            v = s[key][0].numpy()
            zero = _zero_planes(v)
            kept = np.setdiff1d(np.arange(CROP), zero)
            assert len(kept) == CROP // 2 and np.all(np.diff(kept) == 1)  # one slab of round(0.5 * 16) planes
            vol = volumes[s["volume"]]
            origin = s["origin1"] if key == "view1" else s["origin2"]
            np.testing.assert_array_equal(v[..., kept], crop_at(vol, origin)[..., kept])  # untouched inside
            firsts.add(int(kept[0]))
        # the slab's draws come after every other draw of the view: view 1 is the plain view 1 inside the slab
        kept1 = np.setdiff1d(np.arange(CROP), _zero_planes(s["view1"][0].numpy()))
        np.testing.assert_array_equal(s["view1"][0].numpy()[..., kept1], p["view1"][0].numpy()[..., kept1])
    assert len(firsts) > 4  # the slab moves through the crop


def test_slab_probability_and_thickness_range(cache):
    ds = TwoViewDataset(cache, CROP, samples_per_volume=100, slab_prob=0.5, slab_fraction=(0.25, 0.75), **NO_AUG)
    kept = [CROP - len(_zero_planes(ds[i][key][0].numpy())) for i in range(len(ds)) for key in ("view1", "view2")]
    kept = np.asarray(kept)
    slabbed = kept < CROP
    assert abs(slabbed.mean() - 0.5) < 0.08  # 600 views
    assert kept[slabbed].min() >= 4 and kept[slabbed].max() <= 12  # round(0.25 * 16) .. round(0.75 * 16)
    # off (the default) leaves the stream of draws alone: the same views as a dataset built without the option
    off = TwoViewDataset(cache, CROP, samples_per_volume=100, slab_prob=0.0, flip_prob=0.5)
    default = TwoViewDataset(cache, CROP, samples_per_volume=100, flip_prob=0.5)
    for i in range(0, len(ds), 37):
        for key in ("view1", "view2"):
            np.testing.assert_array_equal(off[i][key].numpy(), default[i][key].numpy())
    for bad in (dict(slab_prob=-0.1), dict(slab_prob=1.1), dict(slab_fraction=(0.0, 0.5)),
                dict(slab_fraction=(0.6, 0.5)), dict(slab_fraction=(0.5, 1.5))):
        with pytest.raises(ConfigError, match="slab"):
            TwoViewDataset(cache, CROP, **bad)


def test_slab_from_config_reaches_the_dataset(cache):
    from dagman.config import load_config

    cfg = load_config(size="tiny", overrides=["data.slab_prob=0.25", "data.slab_fraction_range=[0.5,0.75]"])
    ds = TwoViewDataset.from_config(cfg.data, cache)
    assert ds.slab_prob == 0.25 and ds.slab_fraction == (0.5, 0.75)
    assert TwoViewDataset.from_config(load_config(size="tiny").data, cache).slab_prob == 0.0


def _recover_augmentation(view: np.ndarray, crop: np.ndarray):
    """The flips and (a, b) with view == a * flip(crop) + b, found by trying all 8 flip patterns."""
    best = None
    for flips in itertools.product((False, True), repeat=3):
        flipped = crop[tuple(slice(None, None, -1) if f else slice(None) for f in flips)].ravel()
        design = np.stack([flipped, np.ones_like(flipped)], axis=1).astype(np.float64)
        (a, b), *_ = np.linalg.lstsq(design, view.ravel().astype(np.float64), rcond=None)
        err = np.abs(design @ [a, b] - view.ravel()).max()
        if best is None or err < best[0]:
            best = (err, flips, a, b)
    return best


def test_augmentation_statistics(cache, volumes):
    ds = TwoViewDataset(
        cache, 8, flip_prob=0.5, intensity_scale=(0.9, 1.1), intensity_shift=(-0.1, 0.1),
        samples_per_volume=100,
    )
    flips, scales, shifts = [], [], []
    for i in range(len(ds)):
        s = ds[i]
        for view, origin in (("view1", "origin1"), ("view2", "origin2")):
            crop = crop_at(volumes[s["volume"]], s[origin].numpy(), 8)
            err, f, a, b = _recover_augmentation(s[view][0].numpy(), crop)
            assert err < 1e-5  # exactly a flipped, scaled and shifted crop at the reported origin
            flips.append(f), scales.append(a), shifts.append(b)
    flips, scales, shifts = np.array(flips), np.array(scales), np.array(shifts)
    n = len(flips)  # 600 views
    # Each axis flipped with probability 0.5 (binomial sd = sqrt(n)/2 ~ 12).
    assert np.all(np.abs(flips.sum(axis=0) - n / 2) < 4 * np.sqrt(n) / 2), flips.sum(axis=0)
    # a ~ U(0.9, 1.1), b ~ U(-0.1, 0.1): range, mean and spread (uniform sd = width / sqrt(12)).
    assert scales.min() >= 0.9 - 1e-6 and scales.max() <= 1.1 + 1e-6
    assert shifts.min() >= -0.1 - 1e-6 and shifts.max() <= 0.1 + 1e-6
    assert abs(scales.mean() - 1.0) < 0.01 and abs(shifts.mean()) < 0.01
    assert abs(scales.std() - 0.2 / np.sqrt(12)) < 0.01 and abs(shifts.std() - 0.2 / np.sqrt(12)) < 0.01
    # The two views of a pair are augmented independently.
    a1, a2 = scales[0::2], scales[1::2]
    assert abs(np.corrcoef(a1, a2)[0, 1]) < 0.2
    assert 0.3 < np.mean(flips[0::2] != flips[1::2]) < 0.7


def _assert_samples_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_same_seed_same_samples_other_seed_or_epoch_differ(cache):
    one = TwoViewDataset(cache, CROP, seed=7, samples_per_volume=2)
    two = TwoViewDataset(cache, CROP, seed=7, samples_per_volume=2)
    for i in range(len(one)):
        _assert_samples_equal(one[i], two[i])
    other_seed = TwoViewDataset(cache, CROP, seed=8, samples_per_volume=2)
    assert not torch.equal(one[1]["view1"], other_seed[1]["view1"])
    assert not torch.equal(one[(0, 1)]["view1"], one[(1, 1)]["view1"])  # another epoch
    one.set_epoch(1)
    _assert_samples_equal(one[1], two[(1, 1)])  # plain index uses the set epoch
    # A batch is exactly the stacked samples.
    batch = two[[(1, 1), (0, 4)]]
    assert batch["view1"].shape == (2, 1, CROP, CROP, CROP)
    _assert_samples_equal({k: v[0] for k, v in batch.items()}, {**two[(1, 1)], "volume": torch.tensor(1)})
    assert torch.equal(batch["view2"][1], two[(0, 4)]["view2"])


def _collect(loader, epochs):
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.extend(loader)
    return out


def test_workers_do_not_change_batches(cache):
    ds = TwoViewDataset(cache, CROP, seed=1, samples_per_volume=4)
    serial = _collect(two_view_loader(ds, 4, workers=0, seed=5), [0, 1])
    parallel = _collect(two_view_loader(ds, 4, workers=2, seed=5), [0, 1])  # persistent workers
    assert len(serial) == len(parallel) == 2 * (12 // 4)
    for a, b in zip(serial, parallel):
        _assert_samples_equal(a, b)
        assert a["view1"].shape == (4, 1, CROP, CROP, CROP) and a["origin2"].shape == (4, 3)
    # The epochs are shuffled differently, and the epoch reaches the persistent workers.
    order = [b["volume"].tolist() + b["origin1"].ravel().tolist() for b in serial]
    assert order[:3] != order[3:]


def test_workers_use_one_torch_thread_and_build_batches_in_shared_memory(cache):
    class ProbingViews(TwoViewDataset):
        def batch(self, keys):
            out = super().batch(keys)
            out["threads"] = torch.full((len(keys),), torch.get_num_threads())
            out["shared"] = torch.full((len(keys),), out["view1"].is_shared() and out["view2"].is_shared())
            return out

    ds = ProbingViews(cache, CROP)
    batches = list(two_view_loader(ds, 1, workers=1))
    assert [int(b["threads"][0]) for b in batches] == [1, 1, 1]
    assert all(bool(b["shared"][0]) for b in batches)  # written in place, no copy on the way out
    assert not ds[[0]]["view1"].is_shared()  # the main process needs no shared memory


def test_benchmark_runs_and_reports(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_speed.py"
    spec = importlib.util.spec_from_file_location("loader_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--volumes", "2", "--shape", "24", "20", "22", "--crop", "16", "--batch", "2",
            "--workers", "0", "1", "--seconds", "0.2", "--repeats", "2", "--warmup", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "machine: " in out and " cores" in out
    rates = {int(w): float(r) for w, r in
             (line.split()[:2] for line in out.splitlines() if line.strip()[:1].isdigit())}
    assert set(rates) == {0, 1} and min(rates.values()) > 0
    assert out.splitlines()[-1].startswith("result: two-view 16^3 pairs/s, batch 2: workers=0: ")


def test_distributed_ranks_get_disjoint_shards_of_the_same_samples(cache):
    ds = TwoViewDataset(cache, CROP, samples_per_volume=4)  # 12 samples
    keys, batches = {}, {}
    for rank in (0, 1):
        loader = two_view_loader(ds, 2, workers=0, num_replicas=2, rank=rank, seed=3)
        loader.sampler.set_epoch(2)
        keys[rank] = [k for batch in loader.sampler for k in batch]
        batches[rank] = list(loader)
        assert len(loader) == 3
    idx0, idx1 = {i for _, i in keys[0]}, {i for _, i in keys[1]}
    assert len(idx0) == len(idx1) == 6 and not idx0 & idx1 and idx0 | idx1 == set(range(12))
    assert {e for e, _ in keys[0] + keys[1]} == {2}
    # A rank's samples are the same as any process computes for those (epoch, index) keys.
    first = batches[1][0]
    expected = ds[keys[1][:2]]
    _assert_samples_equal(first, expected)

    # With an odd count and drop_last the tail is dropped: shards stay disjoint.
    odd = TwoViewDataset(cache, CROP, samples_per_volume=3)  # 9 samples
    shards = [
        {i for b in EpochBatchSampler(odd, 1, num_replicas=2, rank=r, seed=0) for _, i in b} for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 4 and not shards[0] & shards[1]


@pytest.mark.parametrize("n_samples,batch,world,drop_last", [(12, 2, 2, True), (9, 1, 2, True), (12, 3, 4, True),
                                                              (10, 2, 2, False), (7, 2, 3, False)])
def test_ranks_batches_joined_are_the_one_process_global_batch(cache, n_samples, batch, world, drop_last):
    """Rank r holds rows [r*b, (r+1)*b) of each global batch, so a run continues the same samples-to-rows
    assignment (hence the same masks) on any number of processes."""
    ds = TwoViewDataset(cache, CROP, samples_per_volume=1)
    ds.entries = ds.entries * n_samples  # n_samples 'volumes' (repeats are fine for the keys)
    ds.entries = ds.entries[:n_samples]
    one = EpochBatchSampler(ds, batch * world, num_replicas=1, rank=0, seed=5, drop_last=drop_last)
    ranks = [EpochBatchSampler(ds, batch, num_replicas=world, rank=r, seed=5, drop_last=drop_last)
             for r in range(world)]
    for s in [one, *ranks]:
        s.set_epoch(3)
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1 and all(len(s) == len(per_rank[0]) for s in ranks)
    joined = [sum((p[k] for p in per_rank), []) for k in range(len(per_rank[0]))]
    expected = list(one)
    if drop_last:
        assert joined == expected[: len(joined)]
    else:  # padded: the same permutation, the ranks' rows of each global batch in rank order
        flat = [key for b in joined for key in b]
        assert flat[: len(ds)] == [key for b in expected for key in b][: len(ds)]
    # resuming mid-epoch skips exactly the first batches
    ranks[1].skip_batches = 1
    assert list(ranks[1]) == per_rank[1][1:]


def test_loader_argument_errors(cache):
    ds = TwoViewDataset(cache, CROP)  # 3 samples
    with pytest.raises(ConfigError, match="process group"):
        two_view_loader(ds, 1, workers=0, distributed=True)
    with pytest.raises(ConfigError, match="no batch of 4"):
        two_view_loader(ds, 4, workers=0)
    with pytest.raises(ConfigError, match="rank"):
        two_view_loader(ds, 1, workers=0, num_replicas=2, rank=2)
    loader = two_view_loader(ds, 2, workers=0, drop_last=False, shuffle=False)
    assert [b["volume"].tolist() for b in loader] == [[0, 1], [2]]


def test_volume_smaller_than_crop_is_named(tmp_path):
    cache = make_synthetic_cache(tmp_path, 3, [(40, 40, 40), (40, 30, 40), (12, 40, 40)])
    with pytest.raises(DataError) as err:
        TwoViewDataset(cache, 32, pad_value=None)
    message = str(err.value)
    assert "2 volume(s) smaller than the crop 32x32x32" in message
    assert "synthetic_0001 (40x30x40)" in message and "synthetic_0002 (12x40x40)" in message
    assert "synthetic_0000" not in message and "\n" not in message
    assert len(TwoViewDataset(cache, 12, pad_value=None)) == 3  # fine for a smaller crop


def test_volume_smaller_than_crop_is_padded_by_default(tmp_path):
    cache = make_synthetic_cache(tmp_path, 1, [(40, 20, 36)])
    vol = np.load(cache / "volumes" / "synthetic_0000.npy").astype(np.float32)
    ds = TwoViewDataset(cache, 32, flip_prob=0.0, intensity_scale=None, intensity_shift=None, pad_value=0.0)
    seen_offsets = set()
    for i in range(20):
        ds.set_epoch(i)
        s = ds[0]
        for view, origin in ((s["view1"][0].numpy(), s["origin1"].numpy()), (s["view2"][0].numpy(), s["origin2"].numpy())):
            ox, oy, oz = (int(o) for o in origin)
            assert 0 <= ox <= 8 and -12 <= oy <= 0 and 0 <= oz <= 4
            seen_offsets.add(oy)
            # the whole y axis (20) sits at -oy inside the 32-voxel crop, zeros around it
            np.testing.assert_array_equal(view[:, -oy:-oy + 20, :], vol[ox:ox + 32, :, oz:oz + 32])
            assert not view[:, : -oy, :].any() and not view[:, -oy + 20 :, :].any()
    assert len(seen_offsets) > 3  # the placement inside the crop is random
    # with flips, the padded crop is flipped as a whole
    flipped = TwoViewDataset(cache, 32, flip_prob=1.0, intensity_scale=None, intensity_shift=None)
    f = flipped[0]
    plain = TwoViewDataset(cache, 32, flip_prob=0.0, intensity_scale=None, intensity_shift=None)[0]
    assert torch.equal(f["origin1"], plain["origin1"])
    np.testing.assert_array_equal(f["view1"][0].numpy(), plain["view1"][0].numpy()[::-1, ::-1, ::-1])


def test_bad_cache_and_bad_arguments(tmp_path, cache):
    broken = make_synthetic_cache(tmp_path / "broken", 2, (20, 20, 20))
    (broken / "volumes" / "synthetic_0001.npy").unlink()
    with pytest.raises(DataError, match="missing: volumes/synthetic_0001.npy"):
        TwoViewDataset(broken, 8)

    lying = make_synthetic_cache(tmp_path / "lying", 1, (20, 20, 20))
    manifest = json.loads((lying / MANIFEST).read_text())
    manifest["volumes"][0]["shape"] = [20, 20, 30]
    (lying / MANIFEST).write_text(json.dumps(manifest))
    ds = TwoViewDataset(lying, 8)
    with pytest.raises(DataError, match="shape 20x20x20, the manifest says float16 20x20x30"):
        ds[0]

    with pytest.raises(DataError, match="not a prepared cache"):
        TwoViewDataset(tmp_path / "nothing", 8)
    for kwargs in (dict(crop_size=0), dict(flip_prob=1.5), dict(samples_per_volume=0), dict(seed=-1),
                   dict(intensity_scale=(1.1, 0.9))):
        with pytest.raises(ConfigError):
            TwoViewDataset(cache, **{"crop_size": CROP, **kwargs})


def test_memory_maps_are_per_process_and_not_pickled(cache):
    ds = TwoViewDataset(cache, CROP, max_open_volumes=2)
    before = ds[0]
    for i in range(len(ds)):
        ds[i]
    assert len(ds._open) == 2  # least recently used map closed
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # no volume data travels (volume 0 alone is 27 KB)
    clone = pickle.loads(blob)
    assert len(clone._open) == 0
    _assert_samples_equal(clone[0], before)
