"""OncoPilot's scene logic: CT volume nodes in, lesion segments, measurement table and axis lines out. No Qt.

Usable from Slicer's Python console and from pytest on slicer-core::

    logic = OncoPilotSceneLogic()
    segmentId = logic.segmentLesion(volumeNode, logic.pointPrompt(volumeNode, pointListNode))
    logic.editLesion(volumeNode, segmentationNode, segmentId, rasPoint, positive=False)
    logic.undoLesion(segmentationNode, segmentId)

The model work (``SegmentationSession.segment`` / ``edit``) is the only slow part; the Widget runs it on its
worker thread and calls the ``store*`` methods here on the main thread with the result. Everything that
touches MRML runs on the calling (main) thread.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import slicer
import vtk

from . import results, segments, volumes

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "litemedsam"
DEFAULT_SEGMENTATION_NAME = "OncoPilot lesions"
DEFAULT_TABLE_NAME = "OncoPilot measurements"
HISTORY_DEPTH = 20  # undo steps kept per lesion (a 512 x 512 x 100 mask is 26 MB as bool)
# A box drawn in a slice view spans at most this many slices and is a 2D box prompt, else a 3D ROI prompt.
BOX_MAX_SLICES = 2


def isCancellation(error: BaseException) -> bool:
    """True for the exception a cancelled segmentation ends with (OncoPilotLib's Cancelled or the worker's)."""
    return type(error).__name__ in ("Cancelled", "JobCancelled")


def describeError(error: BaseException) -> str:
    """A message for the user: plain words for the errors a user can cause, the detail for the rest."""
    name = type(error).__name__
    if name == "NothingFoundError":
        return ("No lesion was found there. Click nearer the centre of the lesion, or draw a box around it. "
                f"({error})")
    if name in ("ModuleNotFoundError", "ImportError"):
        return ("A Python package OncoPilot needs is missing (" + str(error) + "). Use Advanced > "
                "Install dependencies.")
    if isinstance(error, ValueError):
        return str(error)
    return f"Unexpected error ({name}): {error}. Details are in the Python console."


def promptMode(prompt) -> str:
    """'point', 'box' or 'roi' for a PointPrompt, BoxPrompt or RoiPrompt."""
    return {"PointPrompt": "point", "BoxPrompt": "box", "RoiPrompt": "roi"}.get(type(prompt).__name__, "point")


@dataclass
class SessionEntry:
    """A SegmentationSession on one volume node, with the model settings it was built with."""

    session: object
    model: str
    device: str


@dataclass
class LesionRef:
    """Which session lesion a segment shows: volume node ID and the session's lesion id."""

    volumeNodeId: str
    lesionId: int


class OncoPilotSceneLogic:
    """MRML <-> OncoPilotLib for promptable lesion segmentation and RECIST measurement."""

    def __init__(self):
        self.model = DEFAULT_MODEL
        self.device = "auto"
        self.measurementTable = None
        # Called as remeasureScheduler(segmentationNode, segmentId) when the user edits a lesion segment; the
        # Widget sets it to a short Qt timer so that painting does not re-measure at every stroke. None = now.
        self.remeasureScheduler = None
        self._sessions: dict[str, SessionEntry] = {}
        self._loadedModels: dict[tuple[str, str], object] = {}
        self._lesions: dict[tuple[str, str], LesionRef] = {}
        self._history: dict[tuple[str, str], list[np.ndarray]] = {}
        self._previews: dict[tuple[str, str], np.ndarray] = {}
        self._rows: dict[tuple[str, str], results.MeasurementRow] = {}
        self._lineIds: dict[tuple[str, str], tuple[str, ...]] = {}
        self._maskTimes: dict[tuple[str, str], int | None] = {}
        self._observations: dict[str, tuple] = {}
        self._muted = 0

    # ---- sessions (model) ---------------------------------------------------------------------------------
    def checkInputVolume(self, volumeNode) -> None:
        """ValueError in plain words unless ``volumeNode`` is a CT this module can segment."""
        volumes.checkCtVolume(volumeNode)
        volumes.volumeGeometry(volumeNode)  # refuses a non-linear parent transform

    def sessionInputs(self, volumeNode):
        """Main thread: (HU array (K, J, I) copy, world VolumeGeometry) of a checked CT volume node."""
        volumes.checkCtVolume(volumeNode)
        return volumes.volumeArrayHU(volumeNode), volumes.volumeGeometry(volumeNode)

    def buildSession(self, arrayKJI: np.ndarray, geometry, model: str | None = None, device: str | None = None):
        """Any thread, no MRML: load the model (cached per model and device) and start a SegmentationSession."""
        from OncoPilotLib.models import load_model
        from OncoPilotLib.predictor import VolumePredictor
        from OncoPilotLib.session import SegmentationSession

        key = (model or self.model, device or self.device)
        if key not in self._loadedModels:
            self._loadedModels[key] = load_model(key[0], device=None if key[1] == "auto" else key[1])
        return SegmentationSession(arrayKJI, geometry, model=VolumePredictor(self._loadedModels[key]))

    def storeSession(self, volumeNodeId: str, session, model: str, device: str) -> None:
        """Remember a session for a volume node ID (any thread: a dict assignment, no MRML)."""
        self._sessions[volumeNodeId] = SessionEntry(session, model, device)

    def sessionById(self, volumeNodeId: str, model: str, device: str):
        """The session for a volume node ID built with this model and device, or None (any thread)."""
        entry = self._sessions.get(volumeNodeId)
        return entry.session if entry is not None and (entry.model, entry.device) == (model, device) else None

    def existingSession(self, volumeNode):
        """The session on this volume if one is ready with the current model and device, else None."""
        return self.sessionById(volumeNode.GetID(), self.model, self.device) if volumeNode is not None else None

    def getSession(self, volumeNode):
        """The session on this volume, built now (synchronously, seconds) if needed."""
        session = self.existingSession(volumeNode)
        if session is None:
            session = self.buildSession(*self.sessionInputs(volumeNode))
            self.storeSession(volumeNode.GetID(), session, self.model, self.device)
        return session

    def resetSessions(self) -> None:
        """Forget every session (e.g. after the model or device changed, or the scene was closed)."""
        self._sessions.clear()
        self._lesions.clear()
        self._history.clear()
        self._previews.clear()

    # ---- prompts ------------------------------------------------------------------------------------------
    def pointPrompt(self, volumeNode, markupsNode):
        """PointPrompt at the voxel nearest to the last control point of ``markupsNode`` (world RAS)."""
        from OncoPilotLib.session import PointPrompt

        volumes.checkCtVolume(volumeNode)
        geometry = volumes.volumeGeometry(volumeNode)
        return PointPrompt(ijk=volumes.voxelAtRAS(geometry, volumes.lastControlPointRAS(markupsNode)))

    def roiPrompt(self, volumeNode, roiNode):
        """BoxPrompt on one slice for a box drawn in an axial view (<= BOX_MAX_SLICES thick), else RoiPrompt."""
        from OncoPilotLib.session import BoxPrompt, RoiPrompt

        volumes.checkCtVolume(volumeNode)
        geometry = volumes.volumeGeometry(volumeNode)
        low, high = volumes.roiVoxelRange(geometry, roiNode)
        if high[2] - low[2] + 1 <= BOX_MAX_SLICES:
            centreK = volumes.rasToIJK(geometry, volumes.roiCornersRAS(roiNode).mean(axis=0))[2]
            k = int(np.clip(np.rint(centreK), low[2], high[2]))
            return BoxPrompt(slice_index=k, box=(int(low[0]), int(low[1]), int(high[0]), int(high[1])))
        return RoiPrompt(ijk_min=tuple(int(v) for v in low), ijk_max=tuple(int(v) for v in high))

    def sliceIndexAtRAS(self, volumeNode, ras) -> int | None:
        """Axial slice k of the volume nearest to a world RAS point (the centre of a slice view), or None."""
        return volumes.sliceIndexAtRAS(volumes.volumeGeometry(volumeNode), ras)

    # ---- output nodes -------------------------------------------------------------------------------------
    def prepareOutputSegmentation(self, volumeNode, segmentationNode=None):
        """The segmentation to write lesions into (created if None), on the volume's grid and transform."""
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", DEFAULT_SEGMENTATION_NAME)
            segmentationNode.CreateDefaultDisplayNodes()
        referenceRole = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        if segmentationNode.GetNodeReference(referenceRole) is None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        self._matchTransform(volumeNode, segmentationNode)
        self.observeSegmentation(segmentationNode)
        return segmentationNode

    @staticmethod
    def _matchTransform(volumeNode, segmentationNode) -> None:
        # Writing a labelmap into a segmentation under another transform misplaces it (measured: 0 voxels land).
        volumeTransform = volumeNode.GetTransformNodeID()
        if segmentationNode.GetTransformNodeID() == volumeTransform:
            return
        if segmentationNode.GetSegmentation().GetNumberOfSegments() > 0:
            raise ValueError(f"The segmentation '{segmentationNode.GetName()}' is moved by a different transform "
                             f"than the CT '{volumeNode.GetName()}'. Choose another output segmentation, or "
                             "put both under the same transform.")
        segmentationNode.SetAndObserveTransformNodeID(volumeTransform)

    def getMeasurementTable(self):
        """The measurement table node (created on first use)."""
        if self.measurementTable is None or self.measurementTable.GetScene() is None:
            self.measurementTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", DEFAULT_TABLE_NAME)
        return self.measurementTable

    # ---- new lesions --------------------------------------------------------------------------------------
    def segmentLesion(self, volumeNode, prompt, segmentationNode=None, progress=None, cancel=None) -> str:
        """Segment a new lesion from ``prompt`` (synchronously) and store it; returns the new segment ID."""
        segmentationNode = self.prepareOutputSegmentation(volumeNode, segmentationNode)
        try:
            lesion = self.getSession(volumeNode).segment(prompt, progress=progress, cancel=cancel)
        except ValueError as error:
            raise ValueError(describeError(error)) from error
        return self.storeNewLesion(volumeNode, segmentationNode, lesion)

    def beginPreview(self, volumeNode, segmentationNode, prompt) -> str:
        """Add the (empty) segment that shows a lesion while it is being propagated; returns its ID."""
        name = segments.freeLesionName(segmentationNode)
        with self._ownChanges():
            segmentId = segments.addLesionSegment(segmentationNode, name, promptMode(prompt), self.model)
        shape = volumes.volumeGeometry(volumeNode).shape_kji
        self._previews[(segmentationNode.GetID(), segmentId)] = np.zeros(shape, dtype=bool)
        return segmentId

    def updatePreview(self, volumeNode, segmentationNode, segmentId: str, sliceMasks) -> None:
        """Show 2D results as they arrive: ``sliceMasks`` is an iterable of (k, (J, I) bool mask)."""
        preview = self._previews.get((segmentationNode.GetID(), segmentId))
        if preview is None:
            return
        for k, mask2d in sliceMasks:
            preview[k] = mask2d
        self._write(segmentationNode, segmentId, preview, volumeNode)

    def discardPreview(self, segmentationNode, segmentId: str) -> None:
        """Remove a preview segment (the propagation was cancelled or failed)."""
        if self._previews.pop((segmentationNode.GetID(), segmentId), None) is not None:
            with self._ownChanges():
                segmentationNode.GetSegmentation().RemoveSegment(segmentId)

    def storeNewLesion(self, volumeNode, segmentationNode, lesion, segmentId: str | None = None) -> str:
        """Write a session Lesion as a new segment (or into its preview segment) and measure it."""
        key = (segmentationNode.GetID(), segmentId)
        if segmentId is None or self._previews.pop(key, None) is None:
            name = segments.freeLesionName(segmentationNode, lesion.name)
            with self._ownChanges():
                segmentId = segments.addLesionSegment(segmentationNode, name, lesion.mode, self.model)
        self._lesions[(segmentationNode.GetID(), segmentId)] = LesionRef(volumeNode.GetID(), int(lesion.id))
        self._write(segmentationNode, segmentId, lesion.mask, volumeNode)
        self.remeasureSegment(segmentId, segmentationNode, volumeNode)
        return segmentId

    # ---- edits and undo -----------------------------------------------------------------------------------
    def lesionRef(self, segmentationNode, segmentId: str) -> LesionRef:
        """The session lesion behind an unlocked OncoPilot segment; ValueError otherwise."""
        segment = segments.requireLesionSegment(segmentationNode, segmentId)
        if segments.isLocked(segmentationNode, segmentId):
            raise ValueError(f"'{segment.GetName()}' is locked (marked finished). Unlock it to change it.")
        ref = self._lesions.get((segmentationNode.GetID(), segmentId))
        if ref is None or slicer.mrmlScene.GetNodeByID(ref.volumeNodeId) is None:
            raise ValueError(f"'{segment.GetName()}' was made in an earlier Slicer session; OncoPilot can only "
                             "correct lesions made since the module was opened. Edit it with Segment Editor.")
        return ref

    def beginEdit(self, volumeNode, segmentationNode, segmentId: str, ras, positive: bool = True) -> dict:
        """Main thread, before an edit click: check it, remember the current mask for undo.

        Returns the keyword arguments of ``session.edit`` (lesion_id, ijk, positive).
        """
        ref = self.lesionRef(segmentationNode, segmentId)
        if ref.volumeNodeId != volumeNode.GetID():
            raise ValueError("This lesion was segmented on another CT volume; select that volume to edit it.")
        ijk = volumes.voxelAtRAS(volumes.volumeGeometry(volumeNode), ras, "The correction point")
        current = segments.readMask(segmentationNode, segmentId, volumeNode)
        history = self._history.setdefault((segmentationNode.GetID(), segmentId), [])
        history.append(current)
        del history[:-HISTORY_DEPTH]
        self._previews[(segmentationNode.GetID(), segmentId)] = current.copy()
        return {"lesion_id": ref.lesionId, "ijk": ijk, "positive": bool(positive)}

    def abortEdit(self, volumeNode, segmentationNode, segmentId: str) -> None:
        """An edit was cancelled or failed: put the mask from before it back and forget that undo step."""
        key = (segmentationNode.GetID(), segmentId)
        self._previews.pop(key, None)
        history = self._history.get(key)
        if history:
            self._write(segmentationNode, segmentId, history.pop(), volumeNode)

    def storeEditedLesion(self, volumeNode, segmentationNode, segmentId: str, lesion) -> None:
        """Write the edited session Lesion into its segment and re-measure."""
        self._previews.pop((segmentationNode.GetID(), segmentId), None)
        with self._ownChanges():
            segments.requireLesionSegment(segmentationNode, segmentId).SetTag(segments.MODE_TAG, lesion.mode)
        self._write(segmentationNode, segmentId, lesion.mask, volumeNode)
        self.remeasureSegment(segmentId, segmentationNode, volumeNode)

    def editLesion(self, volumeNode, segmentationNode, segmentId: str, ras, positive: bool = True,
                   progress=None, cancel=None) -> None:
        """Add a positive (lesion) or negative (not lesion) click at world ``ras`` and re-segment, synchronously."""
        arguments = self.beginEdit(volumeNode, segmentationNode, segmentId, ras, positive)
        try:
            lesion = self.getSession(volumeNode).edit(**arguments, progress=progress, cancel=cancel)
        except BaseException:
            self.abortEdit(volumeNode, segmentationNode, segmentId)
            raise
        self.storeEditedLesion(volumeNode, segmentationNode, segmentId, lesion)

    def canUndo(self, segmentationNode, segmentId: str) -> bool:
        return segmentationNode is not None and bool(self._history.get((segmentationNode.GetID(), segmentId)))

    def isLesionLocked(self, segmentationNode, segmentId: str) -> bool:
        try:
            return segments.isLocked(segmentationNode, segmentId)
        except ValueError:
            return False

    def lesionChoices(self, segmentationNode) -> list[tuple[str, str]]:
        """(segment ID, name) of the OncoPilot lesions of a segmentation, in segment order."""
        segmentation = segmentationNode.GetSegmentation() if segmentationNode is not None else None
        return [(segmentId, segmentation.GetSegment(segmentId).GetName())
                for segmentId in segments.lesionSegmentIds(segmentationNode)]

    def lesionSummary(self, segmentationNode, segmentId: str) -> str:
        """One line for the status label: name, long x short axis (mm), volume (mL)."""
        row = self._rows.get((segmentationNode.GetID(), segmentId))
        if row is None:
            return ""
        return (f"{row.lesion}: {row.longAxisMm:.1f} x {row.shortAxisMm:.1f} mm (long x short axis), "
                f"{row.volumeMl:.2f} mL over {row.slices} slices")

    def undoLesion(self, segmentationNode, segmentId: str, volumeNode=None) -> None:
        """Restore the exact mask the segment had before the last OncoPilot edit."""
        ref = self.lesionRef(segmentationNode, segmentId)
        history = self._history.get((segmentationNode.GetID(), segmentId))
        if not history:
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            raise ValueError(f"Nothing to undo for '{name}'.")
        volumeNode = volumeNode or slicer.mrmlScene.GetNodeByID(ref.volumeNodeId)
        self._write(segmentationNode, segmentId, history.pop(), volumeNode)
        self._undoInSession(volumeNode, ref.lesionId)
        self.remeasureSegment(segmentId, segmentationNode, volumeNode)

    def _undoInSession(self, volumeNode, lesionId: int) -> None:
        entry = self._sessions.get(volumeNode.GetID())
        if entry is None:
            return
        try:
            entry.session.undo(lesionId)  # keeps the session's mask (the base of the next click) in step
        except (ValueError, KeyError, IndexError) as error:
            logger.info("session undo of lesion %s: %s", lesionId, error)

    def setLesionLocked(self, segmentationNode, segmentId: str, locked: bool = True) -> None:
        """Mark a lesion finished (locked: OncoPilot refuses to change it) or unlock it."""
        with self._ownChanges():
            segments.setLocked(segmentationNode, segmentId, locked)
        ref = self._lesions.get((segmentationNode.GetID(), segmentId))
        entry = self._sessions.get(ref.volumeNodeId) if ref else None
        if entry is not None and ref.lesionId in entry.session.lesions:
            entry.session.lock(ref.lesionId, bool(locked))  # keep the session's flag in step

    # ---- measurements -------------------------------------------------------------------------------------
    def remeasureSegment(self, segmentId: str, segmentationNode=None, volumeNode=None):
        """Measure the segment as it is now (after any manual edit), update its table row and axis lines.

        Returns the LesionMeasurement. ``volumeNode`` defaults to the segmentation's reference volume.
        """
        from OncoPilotLib.measurements import measure_lesion

        segmentationNode = segmentationNode or self._onlySegmentation()
        segment = segments.requireLesionSegment(segmentationNode, segmentId)
        volumeNode = volumeNode or self._referenceVolume(segmentationNode)
        geometry = volumes.volumeGeometry(volumeNode)
        with self._ownChanges():
            mask = segments.readMask(segmentationNode, segmentId, volumeNode)
            measurement = measure_lesion(mask, geometry, ct_hu=slicer.util.arrayFromVolume(volumeNode))
            self._rows[(segmentationNode.GetID(), segmentId)] = results.MeasurementRow.fromMeasurement(
                segment.GetName(), measurement, segments.segmentTag(segment, segments.MODE_TAG) or "",
                segments.segmentTag(segment, segments.MODEL_TAG) or "")
            self._updateAxisLines(segmentationNode, segmentId, measurement)
            self._refreshTable()
            self._maskTimes[(segmentationNode.GetID(), segmentId)] = self._maskTime(segmentationNode, segmentId)
        return measurement

    def remeasureAll(self, segmentationNode, volumeNode=None) -> None:
        """Measure every OncoPilot lesion of a segmentation (e.g. after loading a saved scene)."""
        self.observeSegmentation(segmentationNode)
        for segmentId in segments.lesionSegmentIds(segmentationNode):
            self.remeasureSegment(segmentId, segmentationNode, volumeNode)

    def _updateAxisLines(self, segmentationNode, segmentId: str, measurement) -> None:
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        for tag, label, endpoints in ((segments.LONG_AXIS_TAG, "long axis", measurement.long_axis_ras),
                                      (segments.SHORT_AXIS_TAG, "short axis", measurement.short_axis_ras)):
            lineId = segments.segmentTag(segment, tag)
            if measurement.empty or endpoints is None:
                results.removeNodeById(lineId)
                segment.RemoveTag(tag)
                continue
            line = results.axisLineNode(lineId, f"{segment.GetName()} {label}", segment.GetColor())
            results.setLineEndpoints(line, endpoints)
            if line.GetID() != lineId:
                segment.SetTag(tag, line.GetID())
        self._lineIds[(segmentationNode.GetID(), segmentId)] = tuple(
            segments.segmentTag(segment, tag) for tag in (segments.LONG_AXIS_TAG, segments.SHORT_AXIS_TAG))

    def _refreshTable(self) -> None:
        alive = {key: row for key, row in self._rows.items() if self._segmentExists(*key)}
        self._rows = alive
        results.fillTable(self.getMeasurementTable(), list(alive.values()))

    def axisLineNodes(self, segmentationNode, segmentId: str) -> tuple:
        """(long axis line node, short axis line node) of a lesion; None where there is none."""
        segment = segments.requireLesionSegment(segmentationNode, segmentId)
        return tuple(slicer.mrmlScene.GetNodeByID(segments.segmentTag(segment, tag) or "")
                     for tag in (segments.LONG_AXIS_TAG, segments.SHORT_AXIS_TAG))

    # ---- scene plumbing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _ownChanges(self):
        """Changes OncoPilot makes itself: not re-measured as if the user had edited the segment."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    def _write(self, segmentationNode, segmentId: str, maskKJI, volumeNode) -> None:
        with self._ownChanges():
            segments.writeMask(segmentationNode, segmentId, maskKJI, volumeNode)
        self._maskTimes[(segmentationNode.GetID(), segmentId)] = self._maskTime(segmentationNode, segmentId)

    @staticmethod
    def _segmentExists(segmentationNodeId: str, segmentId: str) -> bool:
        node = slicer.mrmlScene.GetNodeByID(segmentationNodeId)
        return node is not None and node.GetSegmentation().GetSegment(segmentId) is not None

    @staticmethod
    def _referenceVolume(segmentationNode):
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        volumeNode = segmentationNode.GetNodeReference(role)
        if volumeNode is None:
            raise ValueError(f"'{segmentationNode.GetName()}' has no reference CT volume to measure on.")
        return volumeNode

    def _onlySegmentation(self):
        observed = [slicer.mrmlScene.GetNodeByID(nodeId) for nodeId in self._observations]
        observed = [node for node in observed if node is not None]
        if len(observed) != 1:
            raise ValueError("Say which segmentation holds the lesion (segmentationNode=...).")
        return observed[0]

    def observeSegmentation(self, segmentationNode) -> None:
        """Re-measure lesions of this segmentation when they are edited, drop their rows when deleted."""
        if segmentationNode.GetID() in self._observations:
            return
        tags = (segmentationNode.AddObserver(slicer.vtkSegmentation.SegmentModified, self._onSegmentModified),
                segmentationNode.AddObserver(slicer.vtkSegmentation.SegmentRemoved, self._onSegmentRemoved))
        self._observations[segmentationNode.GetID()] = (segmentationNode, tags)

    def removeObservers(self) -> None:
        for node, tags in self._observations.values():
            for tag in tags:
                node.RemoveObserver(tag)
        self._observations.clear()

    @vtk.calldata_type(vtk.VTK_STRING)
    def _onSegmentModified(self, segmentationNode, event, segmentId=None) -> None:
        # Labelmap imports (Segment Editor, slicer.util) signal without a segment ID: compare mask times.
        if self._muted:
            return
        changed = ([segmentId] if segmentId else
                   [lesionId for lesionId in segments.lesionSegmentIds(segmentationNode)
                    if self._maskTimes.get((segmentationNode.GetID(), lesionId)) != self._maskTime(
                        segmentationNode, lesionId)])
        for changedId in changed:
            if segments.isLesionSegment(segmentationNode, changedId):
                self._scheduleRemeasure(segmentationNode, changedId)

    def _scheduleRemeasure(self, segmentationNode, segmentId: str) -> None:
        if self.remeasureScheduler is not None:
            self.remeasureScheduler(segmentationNode, segmentId)
            return
        try:
            self.remeasureSegment(segmentId, segmentationNode)
        except ValueError as error:
            logger.warning("could not re-measure %s: %s", segmentId, error)

    @staticmethod
    def _maskTime(segmentationNode, segmentId: str) -> int | None:
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        representation = segment.GetRepresentation(name) if segment is not None else None
        return representation.GetMTime() if representation is not None else None

    @vtk.calldata_type(vtk.VTK_STRING)
    def _onSegmentRemoved(self, segmentationNode, event, segmentId) -> None:
        key = (segmentationNode.GetID(), segmentId)
        for lineId in self._lineIds.pop(key, ()):
            results.removeNodeById(lineId)
        ref = self._lesions.pop(key, None)
        entry = self._sessions.get(ref.volumeNodeId) if ref else None
        if entry is not None and ref.lesionId in entry.session.lesions:
            entry.session.remove(ref.lesionId)
        self._history.pop(key, None)
        if self._rows.pop(key, None) is not None:
            with self._ownChanges():
                self._refreshTable()
