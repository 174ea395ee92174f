"""The one table of MRI modality names and BraTS file-naming schemes, used everywhere.

Canonical names are the BraTS 2018-2021 ones (``t1``, ``t1ce``, ``t2``, ``flair``, ``seg``);
BraTS 2023+ files use ``t1n``, ``t1c``, ``t2w``, ``t2f`` with a dash before the suffix.
Outputs keep the input's scheme, so a file name is always built from (case id, modality, scheme).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEG = "seg"
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Scheme:
    """A BraTS naming scheme: ``<ID><sep><suffix><ext>``."""

    name: str
    sep: str
    suffixes: dict[str, str]  # canonical name (modalities + seg) -> file suffix

    def filename(self, case_id: str, modality: str, ext: str = ".nii.gz") -> str:
        """File name of ``modality`` for ``case_id`` in this scheme."""
        return f"{case_id}{self.sep}{self.suffixes[canonical(modality)]}{ext}"


SCHEMES: dict[str, Scheme] = {
    "brats2020": Scheme(
        "brats2020", "_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
    ),
    "brats2023": Scheme(
        "brats2023", "-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
    ),
}

# every name a user or a file may use -> canonical name
ALIASES: dict[str, str] = {}
for _scheme in SCHEMES.values():
    for _canon, _suffix in _scheme.suffixes.items():
        ALIASES[_suffix] = _canon
        ALIASES[_canon] = _canon


def canonical(name: str) -> str:
    """Canonical modality name for ``name`` (case-insensitive; accepts BraTS 2023 aliases)."""
    key = name.strip().lower()
    if key not in ALIASES:
        valid = ", ".join(sorted(ALIASES))
        raise ValueError(f"unknown modality '{name}'. Valid: {valid}")
    return ALIASES[key]


def modality_index(name: str) -> int:
    """Position of a modality in :data:`MODALITIES` (the channel order of every stack)."""
    return MODALITIES.index(canonical(name))


def strip_nifti_extension(filename: str) -> str | None:
    """File name without ``.nii``/``.nii.gz``, or None when it is not a NIfTI file name."""
    lower = filename.lower()
    for ext in NIFTI_EXTENSIONS:
        if lower.endswith(ext):
            return filename[: -len(ext)]
    return None


# Suffix must follow the scheme's separator exactly: "_t1" never matches "_t1ce".
_PATTERNS: list[tuple[Scheme, str, re.Pattern[str]]] = [
    (scheme, canon, re.compile(rf"^(?P<id>.+){re.escape(scheme.sep)}{re.escape(suffix)}$", re.IGNORECASE))
    for scheme in SCHEMES.values()
    for canon, suffix in scheme.suffixes.items()
]


def parse_filename(filename: str) -> tuple[str, str, str] | None:
    """``(case_id, scheme_name, canonical_modality)`` for a BraTS file name, else None.

    Matching is by exact suffix after the scheme's separator, so ``X_t1ce.nii.gz`` is t1ce and
    never t1, and ``X-t2f.nii.gz`` is FLAIR in the 2023 scheme.
    """
    stem = strip_nifti_extension(filename)
    if stem is None:
        return None
    for scheme, canon, pattern in _PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group("id"), scheme.name, canon
    return None
