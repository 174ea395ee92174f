"""The slice cache (built once, rebuilt on change, never next to the data) and the slice dataset."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_data_or_skip

from mrisynth import cache as cache_mod
from mrisynth.cache import CachedCase, default_cache_dir, load_cached_case
from mrisynth.cases import discover_cases, find_case
from mrisynth.dataset import SliceDataset, assemble_input, check_target_mode, in_channels_for, neighbour_positions
from mrisynth.errors import DataError
from mrisynth.io import read_images
from mrisynth.modalities import MODALITIES
from mrisynth.preprocess import PreprocessConfig, prepare

SMALL = PreprocessConfig(min_window=32)
SHAPE = (40, 40, 12)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def case(case_factory):
    return find_case(case_factory(case_id="Case_001", shape=SHAPE))


def counting_reads(monkeypatch) -> list[int]:
    calls: list[int] = []

    def wrapped(paths):
        calls.append(1)
        return read_images(paths)

    monkeypatch.setattr(cache_mod, "read_images", wrapped)
    return calls


# --------------------------------------------------------------------------- cache


def test_default_cache_dir(monkeypatch, tmp_path):
    assert default_cache_dir() == tmp_path / "cache"  # conftest's private cache
    monkeypatch.delenv("MRISYNTH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mrisynth"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mrisynth"


def test_cache_contents_match_prepare(case, tmp_path):
    cached = load_cached_case(case, SMALL)
    volumes, geometry = read_images(case.modalities)
    prepared = prepare(volumes, geometry.affine, SMALL)
    brain = prepared.brain_slices
    assert cached.slices.dtype == np.float16 and isinstance(cached.slices, np.memmap)
    assert cached.slices.shape == (4, len(brain), *prepared.layout.size)
    assert cached.n_slices == len(brain) < SHAPE[2]  # brain slices only
    np.testing.assert_allclose(cached.slices, prepared.slices[:, brain], atol=1e-3)
    assert cached.meta["brain_slices"] == brain.tolist()
    assert cached.meta["config"] == SMALL.to_dict()
    assert cached.meta["layout"] == prepared.layout.to_dict()
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("Case_001-")
    assert sorted(p.name for p in folders[0].iterdir()) == ["meta.json", "slices.npy"]


def test_cache_built_once_then_reused(case, monkeypatch):
    calls = counting_reads(monkeypatch)
    first = load_cached_case(case, SMALL)
    assert len(calls) == 1
    monkeypatch.setattr(cache_mod, "read_images", lambda paths: pytest.fail("decoded again"))
    second = load_cached_case(case, SMALL)
    np.testing.assert_array_equal(first.slices, second.slices)


@pytest.mark.parametrize("change", ["touch", "rewrite"])
def test_cache_rebuilt_when_a_source_changes(case_factory, monkeypatch, tmp_path, change):
    folder = case_factory(case_id="Case_001", shape=SHAPE)
    case = find_case(folder)
    calls = counting_reads(monkeypatch)
    before = np.array(load_cached_case(case, SMALL).slices)
    t2 = case.modalities["t2"]
    if change == "touch":
        stat = t2.stat()
        os.utime(t2, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    else:
        case_factory(case_id="Case_001", shape=SHAPE, seed=7)  # new content, same names
    after = load_cached_case(find_case(folder), SMALL)
    assert len(calls) == 2
    if change == "rewrite":
        assert not np.array_equal(before, np.asarray(after.slices))
    load_cached_case(find_case(folder), SMALL)
    assert len(calls) == 2


def test_cache_rebuilt_when_the_config_changes(case, monkeypatch):
    calls = counting_reads(monkeypatch)
    a = load_cached_case(case, SMALL)
    b = load_cached_case(case, PreprocessConfig(min_window=64))
    c = load_cached_case(case, PreprocessConfig(min_window=32, high_percentile=98.0))
    assert len(calls) == 3
    assert a.slices.shape[2:] == (32, 32) and b.slices.shape[2:] == (64, 64)
    assert c.meta["config"]["high_percentile"] == 98.0
    load_cached_case(case, SMALL)
    assert len(calls) == 3


def test_cache_never_written_next_to_the_data(case_factory, tmp_path):
    folder = case_factory(case_id="Case_001", shape=SHAPE)
    root = case_factory.root
    before = snapshot(root)
    os.chmod(folder, 0o555)
    try:
        load_cached_case(find_case(folder), SMALL)
    finally:
        os.chmod(folder, 0o755)
    assert snapshot(root) == before
    assert any((tmp_path / "cache").iterdir())


def test_explicit_cache_dir(case, tmp_path):
    load_cached_case(case, SMALL, cache_dir=tmp_path / "elsewhere")
    assert len(list((tmp_path / "elsewhere").iterdir())) == 1
    assert not (tmp_path / "cache").exists()


def test_incomplete_case_is_a_data_error(case_factory):
    case = find_case(case_factory(case_id="Case_002", shape=SHAPE, modalities=("t1", "t2", "flair")))
    with pytest.raises(DataError, match="Case_002 needs all four modalities.*missing t1ce"):
        load_cached_case(case, SMALL)


def test_vanished_source_is_a_data_error(case):
    case.modalities["t2"].unlink()
    with pytest.raises(DataError, match="_t2.nii.gz"):
        load_cached_case(case, SMALL)


def test_incomplete_cache_folder_is_rebuilt(case, tmp_path):
    cached = load_cached_case(case, SMALL)
    (folder,) = list((tmp_path / "cache").iterdir())
    (folder / "meta.json").unlink()
    again = load_cached_case(case, SMALL)
    np.testing.assert_array_equal(cached.slices, again.slices)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "slices.npy"]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary folders left


def test_bad_volume_fails_cleanly_and_caches_nothing(case, tmp_path):
    case.modalities["flair"].write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_cached_case(case, SMALL)
    assert not any(p.name.endswith("meta.json") for p in (tmp_path / "cache").rglob("*"))


# --------------------------------------------------------------------------- dataset


def fake_case(n_slices: int, size: int = 48, seed: int = 0, case_id: str = "F") -> CachedCase:
    rng = np.random.default_rng(seed)
    slices = rng.random((4, n_slices, size, size)).astype(np.float16)
    return CachedCase(id=case_id, slices=slices, meta={})


def test_dataset_length_is_brain_slices_only(case_factory):
    cases = [load_cached_case(find_case(case_factory(case_id=f"C{i}", shape=SHAPE, seed=i)), SMALL) for i in (1, 2)]
    ds = SliceDataset(cases, "flair", crop=32)
    assert len(ds) == sum(c.n_slices for c in cases) == sum(len(c.meta["brain_slices"]) for c in cases)
    assert len(ds) < 2 * SHAPE[2]


@pytest.mark.parametrize("train", [True, False])
def test_item_shapes_and_values(train):
    case = fake_case(5, size=48)
    ds = SliceDataset([case], "any", crop=32, train=train)
    for i in range(len(ds)):
        stack, missing = ds[i]
        assert stack.dtype == torch.float32 and stack.shape == (4, 32, 32)
        assert isinstance(missing, int) and 0 <= missing < 4
        # the item is a 32x32 window of the cached slice
        full = torch.from_numpy(case.slices[:, i].astype(np.float32))
        found = [
            (x, y) for x in range(17) for y in range(17) if torch.equal(full[:, x : x + 32, y : y + 32], stack)
        ]
        assert found
        if not train:
            assert found == [(8, 8)]  # centred


def test_window_smaller_than_the_crop_is_padded():
    case = fake_case(2, size=32)
    stack, _ = SliceDataset([case], "flair", crop=48, train=False)[1]
    assert stack.shape == (4, 48, 48)
    np.testing.assert_array_equal(stack[:, 8:40, 8:40].numpy(), case.slices[:, 1].astype(np.float32))
    assert stack[:, :8].abs().sum() == 0 and stack[:, :, 40:].abs().sum() == 0
    train_stack, _ = SliceDataset([case], "flair", crop=48, train=True)[0]
    assert train_stack.shape == (4, 48, 48)


def test_training_randomness_is_deterministic_per_seed_epoch_index():
    cases = [fake_case(40, size=64)]

    def draws(seed: int, epoch: int) -> list[tuple[int, bytes]]:
        ds = SliceDataset(cases, "any", crop=32, train=True, seed=seed)
        ds.set_epoch(epoch)
        return [(m, s.numpy().tobytes()) for s, m in (ds[i] for i in range(len(ds)))]

    e0 = draws(0, 0)
    assert e0 == draws(0, 0)  # same (seed, epoch): same samples, in any process
    assert draws(0, 1) != e0 and draws(1, 0) != e0
    assert len({m for m, _ in e0}) == 4  # every modality gets to be missing
    # item i does not depend on which items were drawn before it (resumable, worker-safe)
    ds = SliceDataset(cases, "any", crop=32, train=True, seed=0)
    assert (ds[7][1], ds[7][0].numpy().tobytes()) == e0[7]
    assert (ds[-1][1], ds[-1][0].numpy().tobytes()) == e0[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_validation_cycles_missing_modality():
    ds = SliceDataset([fake_case(6), fake_case(5, seed=1)], "any", crop=32, train=False)
    assert [ds[i][1] for i in range(len(ds))] == [i % 4 for i in range(11)]
    assert [ds[i][1] for i in range(len(ds))] == [ds[i][1] for i in range(len(ds))]


@pytest.mark.parametrize("target, index", [("flair", 3), ("t2f", 3), ("t1", 0), ("t1c", 1), ("t2w", 2)])
def test_fixed_target_mode_always_misses_that_modality(target, index):
    for train in (True, False):
        ds = SliceDataset([fake_case(6)], target, crop=32, train=train)
        assert {ds[i][1] for i in range(len(ds))} == {index}


def batch() -> torch.Tensor:
    """[2, 4, 3, 3] with channel c of sample b filled with 10*b + c + 1 (every value traceable)."""
    values = torch.arange(2)[:, None] * 10 + torch.arange(4)[None, :] + 1
    return values[:, :, None, None].expand(2, 4, 3, 3).float().clone()


def test_assemble_input_fixed_flair():
    stack = batch()
    inputs, target = assemble_input(stack, torch.tensor([3, 3]), "flair")
    assert inputs.shape == (2, 3, 3, 3) and target.shape == (2, 1, 3, 3)
    assert inputs[:, :, 0, 0].tolist() == [[1, 2, 3], [11, 12, 13]]  # t1, t1ce, t2 in that order
    assert target[:, 0, 0, 0].tolist() == [4, 14]  # flair
    # the target mode decides: a stray ``missing`` cannot make another modality the target
    _, target2 = assemble_input(stack, torch.tensor([0, 1]), "t2f")
    assert target2[:, 0, 0, 0].tolist() == [4, 14]


def test_assemble_input_fixed_t1ce():
    inputs, target = assemble_input(batch(), torch.tensor([1, 1]), "t1ce")
    assert inputs[:, :, 1, 1].tolist() == [[1, 3, 4], [11, 13, 14]]
    assert target[:, 0, 1, 1].tolist() == [2, 12]


def test_assemble_input_any():
    stack = batch()
    inputs, target = assemble_input(stack, torch.tensor([2, 0]), "any")
    assert inputs.shape == (2, 8, 3, 3) and target.shape == (2, 1, 3, 3)
    assert inputs[0, :, 2, 1].tolist() == [1, 2, 0, 4, 0, 0, 1, 0]  # t2 zeroed, one-hot says t2
    assert inputs[1, :, 0, 2].tolist() == [0, 12, 13, 14, 1, 0, 0, 0]
    assert target[:, 0, 1, 1].tolist() == [3, 11]
    # every pixel of a channel is the same: the one-hot planes are constant planes
    assert torch.all(inputs == inputs[:, :, :1, :1])
    assert torch.equal(stack, batch())  # the input stack is not modified


@pytest.mark.parametrize("target, channels", [("any", 8), ("flair", 3), ("t1n", 3)])
def test_in_channels(target, channels):
    assert in_channels_for(target) == channels


@pytest.mark.parametrize("target, context, channels", [("any", 1, 16), ("any", 2, 24), ("flair", 1, 9), ("t1", 2, 15)])
def test_in_channels_with_context(target, context, channels):
    assert in_channels_for(target, context) == channels


def test_neighbour_positions_repeat_the_edge_slices():
    found = neighbour_positions(np.array([0, 1, 4]), 5, 2)
    assert found.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [2, 3, 4, 4, 4]]
    assert neighbour_positions(np.array([3]), 5, 0).tolist() == [[3]]


def context_batch() -> torch.Tensor:
    """[2, 4, 3, 2, 2]: sample b, modality c, depth d filled with 100*b + 10*c + d (traceable)."""
    values = torch.arange(2)[:, None, None] * 100 + torch.arange(4)[None, :, None] * 10 + torch.arange(3)[None, None, :]
    return values[..., None, None].expand(2, 4, 3, 2, 2).float().clone()


def test_assemble_input_any_with_context():
    inputs, target = assemble_input(context_batch(), torch.tensor([2, 0]), "any")
    assert inputs.shape == (2, in_channels_for("any", 1), 2, 2) and target.shape == (2, 1, 2, 2)
    # modality-major: t1 below, centre, above; t1ce ...; the missing modality's slices all zeroed
    assert inputs[0, :, 0, 0].tolist() == [0, 1, 2, 10, 11, 12, 0, 0, 0, 30, 31, 32, 0, 0, 1, 0]
    assert inputs[1, :, 1, 1].tolist() == [0, 0, 0, 110, 111, 112, 120, 121, 122, 130, 131, 132, 1, 0, 0, 0]
    assert target[:, 0, 0, 0].tolist() == [21, 101]  # the centre slice of the missing modality


def test_assemble_input_fixed_target_with_context():
    inputs, target = assemble_input(context_batch(), torch.tensor([3, 3]), "flair")
    assert inputs.shape == (2, 9, 2, 2)
    assert inputs[1, :, 0, 1].tolist() == [100, 101, 102, 110, 111, 112, 120, 121, 122]
    assert target[:, 0, 1, 0].tolist() == [31, 131]


@pytest.mark.parametrize("train", [True, False])
def test_items_with_context_are_the_slice_and_its_neighbours(train):
    case = fake_case(6, size=48)
    flat = SliceDataset([case], "any", crop=32, train=train)
    deep = SliceDataset([case], "any", crop=32, train=train, context=1)
    for i in range(len(deep)):
        stack, missing = deep[i]
        centre, same_missing = flat[i]
        assert stack.shape == (4, 3, 32, 32) and missing == same_missing
        assert torch.equal(stack[:, 1], centre)  # same crop window and missing modality as without context
        below, above = max(i - 1, 0), min(i + 1, len(deep) - 1)
        assert torch.equal(stack[:, 0], flat_window(case, below, centre, i))
        assert torch.equal(stack[:, 2], flat_window(case, above, centre, i))


def flat_window(case, slice_i: int, centre: torch.Tensor, centre_i: int) -> torch.Tensor:
    """Slice ``slice_i`` of ``case`` cut at the window where ``centre`` (slice ``centre_i``) was found."""
    full = torch.from_numpy(case.slices[:, centre_i].astype(np.float32))
    size = centre.shape[-1]
    (x, y), = [(x, y) for x in range(full.shape[1] - size + 1) for y in range(full.shape[2] - size + 1)
               if torch.equal(full[:, x : x + size, y : y + size], centre)]
    return torch.from_numpy(case.slices[:, slice_i, x : x + size, y : y + size].astype(np.float32))


def test_small_window_with_context_is_padded():
    stack, _ = SliceDataset([fake_case(3, size=32)], "flair", crop=48, train=False, context=2)[0]
    assert stack.shape == (4, 5, 48, 48) and stack[..., :8, :].abs().sum() == 0


def test_bad_target_mode():
    with pytest.raises(ValueError, match="unknown modality"):
        check_target_mode("pd")
    with pytest.raises(ValueError):
        SliceDataset([], "everything")


def test_dataset_through_a_dataloader(case_factory):
    cached = load_cached_case(find_case(case_factory(case_id="C1", shape=SHAPE)), SMALL)
    ds = SliceDataset([cached], "any", crop=32, train=True)
    stack, missing = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    inputs, target = assemble_input(stack, missing, "any")
    assert inputs.shape == (4, 8, 32, 32) and target.shape == (4, 1, 32, 32)
    assert 0 <= float(stack.min()) and float(stack.max()) <= 1


@pytest.mark.realdata
def test_real_case_prepares_with_no_brain_voxel_lost():
    root = real_data_or_skip()
    case = discover_cases(root)[0]
    volumes, geometry = read_images(case.modalities)
    prepared = prepare(volumes, geometry.affine)
    brain = np.zeros(geometry.shape, bool)
    for v in volumes.values():
        brain |= v != 0
    assert prepared.mask.sum() == brain.sum() > 0
    np.testing.assert_array_equal(prepared.layout.to_volume(prepared.mask), brain)
    assert all(s % 16 == 0 and s >= 160 for s in prepared.layout.size)
    assert MODALITIES == prepared.available
