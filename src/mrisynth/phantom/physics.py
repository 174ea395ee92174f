"""MR physics of a phantom case: tissue parameters, protocols, signal equations, bias and noise.

Why physics and not painted intensities: the four BraTS sequences are four views of the same
tissue parameters (PD, T1, T2). Deriving them from one set of parameters through the signal
equations keeps their joint statistics - which a synthesis model learns - physically consistent,
including partial volume (signals are mixed, not parameters) and contrast agent (T1 shortening in
the enhancing rim only). Every value and its source is listed in docs/phantom.md.

Times are in ms, PD is relative to pure water (CSF = 1), concentrations in mM.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("csf", "gm", "wm", "edema", "enhancing", "core")
SEQUENCES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

# (PD, T1, T2) of normal tissue. 1.5 T: BrainWeb (Kwan et al. 1999). 3 T: GM/WM T1 and T2 lie
# between Wansapura et al. 1999 and Stanisz et al. 2005 (two ends drawn between); CSF T1 from
# Lu et al. 2005, CSF T2 kept at the BrainWeb value; PD taken as field-independent.
NORMAL_1P5T: dict[str, tuple[float, float, float]] = {
    "csf": (1.00, 2569.0, 329.0),
    "gm": (0.86, 833.0, 83.0),
    "wm": (0.77, 500.0, 70.0),
}
NORMAL_3T_WANSAPURA: dict[str, tuple[float, float, float]] = {
    "csf": (1.00, 4163.0, 329.0),
    "gm": (0.86, 1331.0, 110.0),
    "wm": (0.77, 832.0, 79.6),
}
NORMAL_3T_STANISZ: dict[str, tuple[float, float, float]] = {
    "csf": (1.00, 4163.0, 329.0),
    "gm": (0.86, 1820.0, 99.0),
    "wm": (0.77, 1084.0, 69.0),
}
JITTER = 0.05  # each normal-tissue parameter varies by up to +-5 % per case
# Gd-DTPA relaxivity r1 in plasma at 37 C (Rohrer et al. 2005), 1/s/mM.
R1_GD = {1.5: 4.1, 3.0: 3.7}


@dataclass(frozen=True)
class Tissue:
    """Proton density (relative) and relaxation times (ms) of one tissue class."""

    pd: float
    t1: float
    t2: float


@dataclass(frozen=True)
class Protocol:
    """Acquisition parameters of one sequence (ms, degrees); ``kind`` picks the signal equation."""

    kind: str  # "spgr", "se" or "flair"
    tr: float
    te: float
    flip_deg: float = 90.0
    ti: float = 0.0


@dataclass(frozen=True)
class Physics:
    """Everything a case's images depend on apart from its anatomy."""

    field_t: float
    tissues: dict[str, Tissue]
    gd_mM: float  # contrast agent concentration in the enhancing tumour on T1CE
    protocols: dict[str, Protocol]  # t1 and t1ce share one protocol
    bias: dict[str, float]  # largest relative deviation of each sequence's bias field
    noise: dict[str, float]  # Rician sigma, as a fraction of the white-matter signal
    max_value: dict[str, float]  # scanner range: the 99.9th percentile maps to this value


def draw_physics(rng: np.random.Generator, core_kind: str) -> Physics:
    """Random field strength, tissue parameters and protocols for one case."""
    field = float(rng.choice([1.5, 3.0], p=[0.4, 0.6]))
    tissues = _normal_tissues(rng, field)
    tissues.update(_lesion_tissues(rng, tissues, core_kind))
    t1_protocol = _t1_protocol(rng, field)
    protocols = {
        "t1": t1_protocol,
        "t1ce": t1_protocol,
        "t2": Protocol("se", tr=float(rng.uniform(3000, 6000)), te=float(rng.uniform(80, 120))),
        "flair": _flair_protocol(rng, field),
    }
    return Physics(
        field_t=field,
        tissues=tissues,
        gd_mM=float(rng.uniform(0.2, 0.5)),
        protocols=protocols,
        bias={name: float(rng.uniform(0.10, 0.20)) for name in SEQUENCES},
        noise={name: float(rng.uniform(0.01, 0.04)) for name in SEQUENCES},
        max_value={name: float(rng.uniform(300, 4000)) for name in SEQUENCES},
    )


def _normal_tissues(rng: np.random.Generator, field: float) -> dict[str, Tissue]:
    """CSF, GM, WM parameters at ``field``, each jittered by up to +-5 %.

    At 3 T one position between the two studies is drawn for all tissues together (not one per
    tissue), so GM and WM keep the T1 ratio that each study measured (1.60-1.68).
    """
    position = rng.uniform()
    out = {}
    for name in ("csf", "gm", "wm"):
        if field == 1.5:
            pd, t1, t2 = NORMAL_1P5T[name]
        else:
            pd, t1_a, t2_a = NORMAL_3T_WANSAPURA[name]
            _, t1_b, t2_b = NORMAL_3T_STANISZ[name]
            t1 = t1_a + position * (t1_b - t1_a)
            t2 = t2_a + position * (t2_b - t2_a)
        j = rng.uniform(1 - JITTER, 1 + JITTER, 3)
        out[name] = Tissue(pd=float(min(pd * j[0], 1.0)), t1=float(t1 * j[1]), t2=float(t2 * j[2]))
    return out


def _lesion_tissues(rng: np.random.Generator, normal: dict[str, Tissue], core_kind: str) -> dict[str, Tissue]:
    """Oedema, enhancing tumour and core, relative to this case's WM and CSF.

    Oedema and tumour hold more free water than WM: longer T1 and T2, higher PD. A necrotic core
    is fluid-like (close to CSF, but protein-rich: shorter T1, so FLAIR does not null it); a
    low-grade non-enhancing core is tumour tissue with long T1 and T2.
    """
    wm, csf = normal["wm"], normal["csf"]
    u = rng.uniform
    edema = Tissue(pd=wm.pd * u(1.05, 1.12), t1=wm.t1 * u(1.3, 1.5), t2=wm.t2 * u(1.5, 2.0))
    enhancing = Tissue(pd=wm.pd * u(1.05, 1.12), t1=wm.t1 * u(1.4, 1.8), t2=wm.t2 * u(1.4, 1.8))
    if core_kind == "low_grade":
        core = Tissue(pd=wm.pd * u(1.08, 1.15), t1=wm.t1 * u(1.7, 2.2), t2=wm.t2 * u(1.8, 2.5))
    else:
        core = Tissue(pd=csf.pd * u(0.90, 1.00), t1=csf.t1 * u(0.5, 0.75), t2=csf.t2 * u(0.6, 1.0))
    return {"edema": edema, "enhancing": enhancing, "core": core}


def _t1_protocol(rng: np.random.Generator, field: float) -> Protocol:
    """T1-weighted: 2D spin echo (half the cases) or 3D spoiled gradient echo.

    The gradient echo's flip angle stays above the Ernst angle of white matter
    (``arccos(e^(-TR/T1))``: about 19 deg at 1.5 T, TR 28 ms; 11 deg at 3 T, TR 20 ms), where
    the image is T1- rather than PD-weighted and white matter is brighter than grey matter.
    """
    if rng.uniform() < 0.5:
        return Protocol("se", tr=float(rng.uniform(400, 700)), te=float(rng.uniform(8, 15)))
    if field == 1.5:
        tr, flip = rng.uniform(15.0, 30.0), rng.uniform(25.0, 40.0)
    else:
        tr, flip = rng.uniform(8.0, 20.0), rng.uniform(15.0, 25.0)
    return Protocol("spgr", tr=float(tr), te=float(rng.uniform(3, 6)), flip_deg=float(flip))


def flair_null_ti(t1_csf: float, tr: float) -> float:
    """Inversion time that nulls a T1 of ``t1_csf`` at repetition ``tr`` (ms).

    From ``1 - 2 e^(-TI/T1) + e^(-TR/T1) = 0``: ``TI = T1 (ln 2 - ln(1 + e^(-TR/T1)))``.
    """
    return float(t1_csf * (np.log(2.0) - np.log1p(np.exp(-tr / t1_csf))))


def _flair_protocol(rng: np.random.Generator, field: float) -> Protocol:
    """FLAIR whose TI nulls the literature CSF T1 of the field (as a scanner protocol does).

    The case's own CSF T1 differs by up to 5 %, so CSF is nearly, not exactly, black.
    """
    tr = float(rng.uniform(8000, 11000))
    nominal_csf_t1 = NORMAL_1P5T["csf"][1] if field == 1.5 else NORMAL_3T_WANSAPURA["csf"][1]
    return Protocol("flair", tr=tr, te=float(rng.uniform(100, 140)), ti=flair_null_ti(nominal_csf_t1, tr))


def spgr_signal(t: Tissue, p: Protocol) -> float:
    """Spoiled gradient echo: ``PD sin a (1 - E1) / (1 - cos a E1) e^(-TE/T2*)``, T2* taken as T2."""
    e1 = np.exp(-p.tr / t.t1)
    a = np.deg2rad(p.flip_deg)
    return float(t.pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-p.te / t.t2))


def spin_echo_signal(t: Tissue, p: Protocol) -> float:
    """Spin echo: ``PD (1 - e^(-TR/T1)) e^(-TE/T2)``."""
    return float(t.pd * (1 - np.exp(-p.tr / t.t1)) * np.exp(-p.te / t.t2))


def flair_signal(t: Tissue, p: Protocol) -> float:
    """Inversion recovery, magnitude: ``PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2)``."""
    recovery = 1 - 2 * np.exp(-p.ti / t.t1) + np.exp(-p.tr / t.t1)
    return float(t.pd * abs(recovery) * np.exp(-p.te / t.t2))


SIGNALS = {"spgr": spgr_signal, "se": spin_echo_signal, "flair": flair_signal}


def with_gadolinium(t: Tissue, concentration_mM: float, field: float) -> Tissue:
    """T1 after contrast: ``1/T1 += r1 C`` (r1 in 1/s/mM, so 1000/T1 is in 1/s)."""
    r1_per_s = 1000.0 / t.t1 + R1_GD[field] * concentration_mM
    return Tissue(pd=t.pd, t1=1000.0 / r1_per_s, t2=t.t2)


def class_signals(physics: Physics, sequence: str) -> dict[str, float]:
    """Noise-free signal of each pure tissue class in ``sequence``."""
    protocol = physics.protocols[sequence]
    equation = SIGNALS[protocol.kind]
    out = {}
    for name in CLASSES:
        tissue = physics.tissues[name]
        if sequence == "t1ce" and name == "enhancing":
            tissue = with_gadolinium(tissue, physics.gd_mM, physics.field_t)
        out[name] = equation(tissue, protocol)
    return out


def mix(voxels: np.ndarray, signals: dict[str, float]) -> np.ndarray:
    """Partial-volume signal: ``sum_k fraction_k * S_k`` (signals mixed, not parameters).

    ``voxels`` holds one row of fractions per class, in CLASSES order.
    """
    weights = np.array([signals[name] for name in CLASSES], dtype=np.float32)
    return weights @ voxels


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random quadratic polynomial, max |log| = strength.

    Why quadratic: receive-coil sensitivity varies slowly over the head; the 9 terms (linear,
    squared and cross) are built from 1-D and 2-D pieces so the 3-D field costs two additions.
    """
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    c = rng.standard_normal(9).astype(np.float32)
    in_xy = (c[0] * x + c[3] * x * x)[:, None] + (c[1] * y + c[4] * y * y)[None, :] + c[6] * np.outer(x, y)
    in_xz = (c[2] * z + c[5] * z * z)[None, :] + c[7] * np.outer(x, z)
    in_yz = c[8] * np.outer(y, z)
    log_field = in_xy[:, :, None] + in_xz[:, None, :] + in_yz[None, :, :]
    log_field -= np.float32(log_field.mean())
    log_field *= np.float32(strength / max(float(np.abs(log_field).max()), 1e-6))
    return np.exp(log_field)


def rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise: ``|S + n1 + i n2|``."""
    real = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    imag = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt(real * real + imag * imag)
