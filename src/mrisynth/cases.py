"""Finding BraTS cases under a root folder, in either naming scheme, at any depth.

A case is the set of NIfTI files in one folder that share an ID prefix. Files are matched by exact
suffix (``_t1`` never matches ``_t1ce``). Hidden files and folders (names starting with '.') are
skipped. Problems found while discovering (two files for one modality, mixed schemes, an
unrecognised NIfTI next to the case) are collected on the case, not raised, so that
``mrisynth cases`` can show every problem of a cohort at once.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, UsageError
from .modalities import MODALITIES, SCHEMES, SEG, parse_filename, strip_nifti_extension

#: suffix of the uncertainty map written beside a synthesized volume (``<ID>_flair_std.nii.gz``)
STD_SUFFIX = "_std"

# BraTS 2020 case 355 ships its segmentation as W39_1998.09.19_Segm.nii
_SEG_QUIRK_SUFFIXES = ("_segm",)


@dataclass
class Case:
    """One subject: its ID, naming scheme, the files per canonical modality, and what is wrong."""

    id: str
    scheme: str
    folder: Path
    modalities: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    problems: list[str] = field(default_factory=list)  # make the case ambiguous: it is not used
    notes: list[str] = field(default_factory=list)  # worth knowing, harmless (e.g. an unrecognised file)

    @property
    def missing(self) -> list[str]:
        """Canonical modalities with no file, in the standard order."""
        return [m for m in MODALITIES if m not in self.modalities]

    def output_name(self, modality: str, suffix: str = "") -> str:
        """Output file name for ``modality`` in this case's naming scheme (``suffix`` e.g. ``_std``)."""
        name = SCHEMES[self.scheme].filename(self.id, modality)
        return name[: -len(".nii.gz")] + suffix + ".nii.gz"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "scheme": self.scheme,
            "folder": str(self.folder),
            "modalities": {m: str(p) for m, p in self.modalities.items()},
            "seg": str(self.seg) if self.seg else None,
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


def discover_cases(root: str | Path) -> list[Case]:
    """All cases under ``root`` (a case folder itself, or any folder above case folders), sorted by ID."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: folder not found")
    if not root.is_dir():
        raise UsageError(f"{root}: expected a folder of cases, found a file")
    cases: list[Case] = []
    seen: set[str] = set()

    def unreadable(error: OSError) -> None:
        if Path(error.filename or "") == root:
            raise DataError(f"{root}: cannot read this folder ({error.strerror or error})")
        print(f"warning: {error.filename}: cannot read this folder ({error.strerror or error}); its cases are skipped", file=sys.stderr)

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        # a symbolic link back to a folder above must not make the walk go round for ever
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        # hidden entries are never cases: macOS '._X_t1.nii' resource forks (common in zip
        # archives), '.ipynb_checkpoints', and mrisynth's own temporary output files
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        cases.extend(_cases_in_folder(Path(folder), sorted(f for f in files if not f.startswith("."))))
    return sorted(cases, key=lambda c: (c.id, str(c.folder)))


def _cases_in_folder(folder: Path, files: list[str]) -> list[Case]:
    """Group the recognised NIfTI files of one folder into cases."""
    grouped: dict[str, list[tuple[str, str, str]]] = {}
    unrecognised: list[str] = []
    for name in files:
        parsed = parse_filename(name)
        if parsed is None:
            if strip_nifti_extension(name) is not None:
                unrecognised.append(name)
            continue
        case_id, scheme, modality = parsed
        grouped.setdefault(case_id, []).append((name, scheme, modality))
    by_id: dict[str, Case] = {}
    for case_id, entries in grouped.items():
        # the case's scheme is that of most of its files (the first scheme in SCHEMES on a tie),
        # not that of whichever file sorts first, so outputs follow the majority
        votes = [scheme for _name, scheme, _modality in entries]
        scheme = max(SCHEMES, key=lambda s: (votes.count(s), -list(SCHEMES).index(s)))
        case = by_id[case_id] = Case(id=case_id, scheme=scheme, folder=folder)
        for name, file_scheme, modality in entries:
            _add_file(case, file_scheme, modality, folder / name)
    attached = _attach_quirky_segmentations(by_id, folder, unrecognised)
    others = [n for n in unrecognised if n != attached]
    if others:
        note = f"unrecognised NIfTI file{'s' if len(others) > 1 else ''} in the folder: {', '.join(others)}"
        for case in by_id.values():
            case.notes.append(note)
    return list(by_id.values())


def _add_file(case: Case, scheme: str, modality: str, path: Path) -> None:
    """Record one file on its case, noting duplicates and mixed naming schemes as problems."""
    if scheme != case.scheme:
        case.problems.append(f"mixed naming schemes: {path.name} is {scheme}, the case is {case.scheme}")
    if modality == SEG:
        if case.seg is not None:
            case.problems.append(f"two files for seg: {case.seg.name} and {path.name}")
        else:
            case.seg = path
        return
    if modality in case.modalities:
        case.problems.append(f"two files for {modality}: {case.modalities[modality].name} and {path.name}")
        return
    case.modalities[modality] = path


def _attach_quirky_segmentations(by_id: dict[str, Case], folder: Path, unrecognised: list[str]) -> str | None:
    """A lone ``*_Segm.nii`` (BraTS 2020 case 355) is the segmentation of the folder's only case.

    Returns the name of the file attached, if any.
    """
    quirky = [n for n in unrecognised if strip_nifti_extension(n).lower().endswith(_SEG_QUIRK_SUFFIXES)]
    if len(by_id) != 1 or len(quirky) != 1:
        return None
    case = next(iter(by_id.values()))
    if case.seg is not None:
        return None
    case.seg = folder / quirky[0]
    return quirky[0]


def check_case_files(case: Case) -> None:
    """Deeper checks for ``mrisynth cases --strict``, recorded as problems of ``case``: the images'
    headers (readable, 3D, one grid) and the segmentation's labels (decoded; BraTS's label set)."""
    from .io import BRATS_LABELS, check_same_grid, geometry_of, label_problem, load_volume, open_nifti

    reference = None
    for path in [*case.modalities.values(), *([case.seg] if case.seg else [])]:
        try:
            geometry = geometry_of(open_nifti(path), path)
            reference = reference or geometry
            check_same_grid(reference, geometry)
        except DataError as exc:
            case.problems.append(str(exc))
    if case.seg is None:
        return
    try:
        data, _ = load_volume(case.seg, allow_constant=True)
    except DataError as exc:
        if str(exc) not in case.problems:
            case.problems.append(str(exc))
        return
    problem = label_problem(case.seg, data, BRATS_LABELS[case.scheme])
    if problem:
        case.problems.append(problem)


def find_case(root: str | Path) -> Case:
    """The single case in ``root``; a clear error when there are none or several."""
    cases = discover_cases(root)
    if not cases:
        raise DataError(f"{root}: expected BraTS NIfTI files (<ID>_t1.nii.gz or <ID>-t1n.nii.gz ...), found none")
    if len(cases) > 1:
        ids = ", ".join(c.id for c in cases[:5])
        raise DataError(f"{root}: expected one case, found {len(cases)} ({ids}{', ...' if len(cases) > 5 else ''})")
    return cases[0]


def format_table(cases: list[Case]) -> str:
    """A plain-text table for ``mrisynth cases``: case, scheme, modalities, segmentation, problems."""
    rows = [("case", "scheme", "modalities", "seg", "problems")]
    for c in cases:
        present = " ".join(m for m in MODALITIES if m in c.modalities) or "-"
        rows.append((c.id, c.scheme, present, "yes" if c.seg else "no", "; ".join(c.problems + [f"note: {n}" for n in c.notes]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    n_complete = sum(1 for c in cases if not c.missing)
    n_problems = sum(1 for c in cases if c.problems)
    lines.append(f"{len(cases)} cases: {n_complete} with all four modalities, {n_problems} with problems")
    return "\n".join(lines)
