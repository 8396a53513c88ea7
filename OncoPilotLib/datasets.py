"""Finding annotated CT cases on disk, shared by ``oncopilot train`` and ``oncopilot evaluate``.

Two layouts are accepted:

- a folder of pairs ``<id>_ct<ext>`` + ``<id>_mask<ext>`` with ``<ext>`` one of ``.nii.gz``, ``.nii``, ``.nrrd``,
  ``.seg.nrrd``, ``.mha``, ``.mhd`` (the two files of a pair may use different extensions);
- a CSV file with columns ``image`` and ``mask`` (paths, relative to the CSV's folder or absolute) and optional
  ``id``, ``label`` (the mask value of the lesion; default: every non-zero voxel) and ``kind`` (free text such as
  "lung nodule", used to stratify splits).

A case is one CT with one mask; every connected component (26-connectivity, in voxels) of its lesion mask is a
separate lesion (:func:`split_lesions`).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    """One annotated CT.

    Attributes:
        id: case identifier (file stem without ``_ct`` or the CSV's ``id``).
        image: path of the CT volume (HU).
        mask: path of the label map, same grid as the image.
        label: mask value of the lesion(s), or None for every non-zero voxel.
        kind: free-text category (the CSV's ``kind``; for a folder, the id's leading letters, e.g. ``sts``, ``lidc``).
    """

    id: str
    image: str
    mask: str
    label: int | None = None
    kind: str = ""


def _split_extension(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    return None


def _kind_from_id(case_id: str) -> str:
    match = re.match(r"[A-Za-z]+", case_id)
    return match.group(0).lower() if match else ""


def _cases_from_folder(folder: Path) -> list[Case]:
    images, masks = {}, {}
    for path in sorted(folder.iterdir()):
        parts = _split_extension(path.name)
        if parts is None:
            continue
        stem = parts[0]
        if stem.endswith("_ct"):
            images[stem[:-3]] = path
        elif stem.endswith("_mask"):
            masks[stem[:-5]] = path
    unpaired = sorted(set(images) ^ set(masks))
    if unpaired:
        logger.warning("%s: %d files without their _ct/_mask partner ignored (e.g. %s)", folder, len(unpaired),
                       unpaired[0])
    return [Case(case_id, str(images[case_id]), str(masks[case_id]), None, _kind_from_id(case_id))
            for case_id in sorted(set(images) & set(masks))]


def _resolve_path(value: str, base: Path) -> str:
    path = Path(value)
    return str(path if path.is_absolute() else (base / path))


def _case_from_row(row: dict, base: Path, line: int) -> Case:
    image, mask = (row.get("image") or "").strip(), (row.get("mask") or "").strip()
    if not image or not mask:
        raise ValueError(f"line {line}: both 'image' and 'mask' are needed")
    parts = _split_extension(Path(image).name)
    stem = parts[0] if parts else Path(image).stem
    case_id = (row.get("id") or "").strip() or (stem[:-3] if stem.endswith("_ct") else stem)
    label_text = (row.get("label") or "").strip()
    label = int(float(label_text)) if label_text else None
    return Case(case_id, _resolve_path(image, base), _resolve_path(mask, base), label, (row.get("kind") or "").strip())


def _cases_from_csv(path: Path) -> list[Case]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "mask"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a case list needs the columns 'image' and 'mask' (found {reader.fieldnames})")
        return [_case_from_row(row, path.parent, line) for line, row in enumerate(reader, start=2)]


def find_cases(path) -> list[Case]:
    """All cases of a folder of ``<id>_ct`` + ``<id>_mask`` pairs or of a CSV case list, sorted as found.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a CSV without image/mask columns, duplicate ids, or no case at all.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or CSV file")
    cases = _cases_from_folder(path) if path.is_dir() else _cases_from_csv(path)
    ids = [case.id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate case ids {', '.join(duplicates[:5])}")
    if not cases:
        raise ValueError(f"{path}: no <id>_ct + <id>_mask pairs or CSV rows found")
    return cases


def lesion_mask(mask: np.ndarray, label: int | None) -> np.ndarray:
    """(K, J, I) label map -> bool lesion mask: voxels equal to ``label``, or every non-zero voxel if None."""
    return mask > 0 if label is None else mask == label


def split_lesions(mask: np.ndarray, min_voxels: int = 1) -> list[np.ndarray]:
    """(K, J, I) bool mask -> one (K, J, I) bool mask per connected component (26-connectivity), largest first.

    Components of fewer than ``min_voxels`` voxels (annotation specks) are dropped.
    """
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    order = [int(i) for i in np.argsort(-sizes[1:], kind="stable") + 1 if sizes[i] >= min_voxels]
    return [labels == index for index in order]


def load_case(case: Case):
    """Read a case: (:class:`~OncoPilotLib.io.CTVolume`, (K, J, I) bool lesion mask on the same grid)."""
    from .io import read_mask, read_volume

    volume = read_volume(case.image)
    return volume, lesion_mask(read_mask(case.mask, like=volume), case.label)
