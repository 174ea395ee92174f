"""Shared fixtures: small synthetic BraTS-like cases written as NIfTI into a temporary folder.

Tests never need real data; those that use the 20 real cases in ../shared are marked ``realdata``
and skip cleanly when the folder is absent.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrisynth.modalities import MODALITIES, SCHEMES

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brats18"
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])


def synthetic_brain(shape: tuple[int, int, int] = (48, 48, 32), seed: int = 0) -> dict[str, np.ndarray]:
    """Four related 'modalities' and a tumour label on an ellipsoid brain (float32, background 0).

    The modalities are different smooth functions of one anatomy plus a lesion, so a network can
    learn one from the others, like real MRI.
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.85, 0.75)))
    brain = radius < 1.0
    anatomy = 0.5 + 0.25 * np.sin(3 * grid[0] + rng.uniform(0, 6)) * np.cos(2 * grid[1]) + 0.2 * grid[2]
    centre = rng.uniform(-0.3, 0.3, size=3)
    lesion_r = sum((g - c) ** 2 for g, c in zip(grid, centre))
    tumour = lesion_r < 0.05
    edema = (lesion_r < 0.12) & ~tumour
    seg = np.where(tumour, 4, np.where(edema, 2, 0)).astype(np.int16)
    seg[~brain] = 0
    noise = lambda: rng.normal(0, 0.01, shape)  # noqa: E731
    vols = {
        "t1": 300 + 400 * anatomy - 100 * edema + noise(),
        "t1ce": 300 + 400 * anatomy + 500 * tumour + noise(),
        "t2": 900 - 500 * anatomy + 300 * edema + 200 * tumour + noise(),
        "flair": 500 - 200 * anatomy + 600 * edema + 300 * tumour + noise(),
    }
    out = {m: np.where(brain, v, 0).astype(np.float32) for m, v in vols.items()}
    out["seg"] = seg
    return out


def write_case(
    folder: Path,
    case_id: str = "Case_001",
    scheme: str = "brats2020",
    shape: tuple[int, int, int] = (48, 48, 32),
    modalities: tuple[str, ...] = MODALITIES,
    seg: bool = True,
    dtype: type = np.int16,
    affine: np.ndarray | None = None,
    seed: int = 0,
    ext: str = ".nii.gz",
) -> Path:
    """Write a synthetic case as ``folder/<case_id>/<case_id>_<mod>.nii.gz`` and return its folder."""
    case_dir = Path(folder) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    arrays = synthetic_brain(shape, seed)
    affine = BRATS_AFFINE if affine is None else affine
    names = list(modalities) + (["seg"] if seg else [])
    for m in names:
        data = arrays[m].astype(np.int16 if m == "seg" else dtype)
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(case_dir / SCHEMES[scheme].filename(case_id, m, ext)))
    return case_dir


@pytest.fixture
def case_factory(tmp_path):
    """``case_factory(case_id=..., **kw)`` writes a synthetic case under a temporary data root."""
    root = tmp_path / "data"

    def make(**kwargs) -> Path:
        return write_case(root, **kwargs)

    make.root = root
    return make


@pytest.fixture
def one_torch_thread():
    """Tiny inputs on a shared 2-core CPU: two torch threads spin against each other, and the
    OpenMP synchronisation between many small ops costs more than the arithmetic; one thread is
    many times faster. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch  # here, not at the top: `mrisynth --help` is tested not to import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own slice cache, so tests never touch the user's cache directory."""
    monkeypatch.setenv("MRISYNTH_CACHE_DIR", str(tmp_path / "cache"))


def real_data_or_skip() -> Path:
    """The real BraTS 2018 sample, or a clean skip when ../shared is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("real data ../shared/data/brats18 not present")
    return REAL_DATA
