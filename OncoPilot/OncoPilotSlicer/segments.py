"""Lesions as segments of a vtkMRMLSegmentationNode: naming, tags, writing and reading masks.

A segment made by OncoPilot carries tags (``vtkSegment.SetTag``) so that it can be recognised again after the
scene is saved and reloaded: ``OncoPilot.Lesion`` (always "1"), ``OncoPilot.Mode`` (point / box / roi /
point-edit), ``OncoPilot.Model``, ``OncoPilot.Locked`` ("1" = finished, OncoPilot no longer changes it) and the
IDs of its two axis line nodes. Segments without the tag belong to the user and are never modified.
"""

from __future__ import annotations

import re

import numpy as np
import slicer
import vtk

LESION_TAG = "OncoPilot.Lesion"
MODE_TAG = "OncoPilot.Mode"
MODEL_TAG = "OncoPilot.Model"
LOCKED_TAG = "OncoPilot.Locked"
LONG_AXIS_TAG = "OncoPilot.LongAxisLineID"
SHORT_AXIS_TAG = "OncoPilot.ShortAxisLineID"

_LESION_NAME = re.compile(r"^Lesion (\d+)$")


def segmentTag(segment, tag: str) -> str | None:
    """Value of a segment tag, None if the segment is None or has no such tag."""
    if segment is None:
        return None
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def isLesionSegment(segmentationNode, segmentId: str) -> bool:
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    return segmentTag(segment, LESION_TAG) == "1"


def lesionSegmentIds(segmentationNode) -> list[str]:
    """IDs of OncoPilot's segments, in the order they appear in the segmentation."""
    if segmentationNode is None:
        return []
    segmentation = segmentationNode.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    return [segmentId for segmentId in ids if isLesionSegment(segmentationNode, segmentId)]


def freeLesionName(segmentationNode, preferred: str | None = None) -> str:
    """``preferred`` if no segment uses that name, else the first free "Lesion N" after the highest taken N."""
    segmentation = segmentationNode.GetSegmentation()
    taken = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    if preferred and preferred not in taken:
        return preferred
    numbers = [int(match.group(1)) for match in map(_LESION_NAME.match, taken) if match]
    number = max(numbers, default=0) + 1
    while f"Lesion {number}" in taken:
        number += 1
    return f"Lesion {number}"


def addLesionSegment(segmentationNode, name: str, mode: str, model: str) -> str:
    """Add an empty, tagged lesion segment named ``name`` (must be free); returns its segment ID."""
    segmentation = segmentationNode.GetSegmentation()
    segmentId = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID("OncoPilot_" + name), name)
    segment = segmentation.GetSegment(segmentId)
    segment.SetTag(LESION_TAG, "1")
    segment.SetTag(MODE_TAG, mode)
    segment.SetTag(MODEL_TAG, model)
    segment.SetTag(LOCKED_TAG, "0")
    return segmentId


def requireLesionSegment(segmentationNode, segmentId: str):
    """The vtkSegment of an OncoPilot lesion; ValueError for a missing or user-made segment."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
    if segment is None:
        raise ValueError("The lesion no longer exists in the segmentation (was it deleted?).")
    if segmentTag(segment, LESION_TAG) != "1":
        raise ValueError(f"'{segment.GetName()}' was not made by OncoPilot; OncoPilot does not change it.")
    return segment


def isLocked(segmentationNode, segmentId: str) -> bool:
    return segmentTag(requireLesionSegment(segmentationNode, segmentId), LOCKED_TAG) == "1"


def setLocked(segmentationNode, segmentId: str, locked: bool) -> None:
    requireLesionSegment(segmentationNode, segmentId).SetTag(LOCKED_TAG, "1" if locked else "0")


def writeMask(segmentationNode, segmentId: str, maskKJI: np.ndarray, volumeNode) -> None:
    """Replace the segment's voxels by a (K, J, I) bool/0-1 mask on ``volumeNode``'s voxel grid."""
    mask = np.ascontiguousarray(maskKJI, dtype=np.uint8)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, segmentId, volumeNode)


def readMask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """(K, J, I) bool mask of the segment resampled onto ``volumeNode``'s voxel grid."""
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0


def segmentColor(segmentationNode, segmentId: str) -> tuple[float, float, float]:
    return tuple(segmentationNode.GetSegmentation().GetSegment(segmentId).GetColor())
