"""OncoPilot: click a CT lesion, get its 3D segment and RECIST measurements, correct it with clicks.

Layers: this file holds the Slicer module (metadata), the parameter node, the Widget (binds the .ui, runs model
work on one worker thread) and the Logic (``OncoPilotLogic``, built on ``OncoPilotSlicer.logic``: MRML in,
MRML out, no Qt). The model and measurements come from the headless library ``OncoPilotLib``.

Nothing heavy is imported here: torch, scipy and the model packages are imported only when a segmentation
runs, after they have been installed on demand, so the module loads in a Slicer without them.
"""

import logging
import os
import sys

import qt
import slicer
import vtk
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _addLibraryPaths() -> None:
    """Make OncoPilotSlicer (beside this file) and OncoPilotLib importable.

    Built extension: OncoPilotLib is copied beside this file. Source checkout (module path added in Slicer's
    settings): OncoPilotLib sits in the repository root, one folder up.
    """
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.dirname(moduleDir), moduleDir):
        hasLibrary = os.path.isfile(os.path.join(folder, "OncoPilotLib", "__init__.py"))
        if (folder == moduleDir or hasLibrary) and folder not in sys.path:
            sys.path.insert(0, folder)


_addLibraryPaths()

from OncoPilotSlicer import dependencies  # noqa: E402  (needs the paths above)
from OncoPilotSlicer.logic import OncoPilotSceneLogic, describeError, isCancellation  # noqa: E402
from OncoPilotSlicer.volumes import lastControlPointRAS  # noqa: E402
from OncoPilotSlicer.worker import Job, Worker  # noqa: E402

MODEL_CHOICES = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")


#
# OncoPilot
#


class OncoPilot(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("OncoPilot")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # the PyTorch extension is needed only to run, and is asked for then
        self.parent.contributors = ["OncoPilot contributors"]
        self.parent.helpText = _("""
Promptable segmentation and RECIST 1.1 measurement of solid tumours on CT.
<ol><li>Select the CT in <b>Inputs</b>.</li>
<li><b>Place point</b> (P) and click on a lesion, or <b>Draw box</b> (B) around it in an axial view.
The lesion appears on the clicked slice first, then on its neighbours.</li>
<li>Correct it with <b>Add positive point</b> (+) on missed tumour and <b>Add negative point</b> (-) on wrongly
included tissue; <b>Undo</b> (U) restores the previous outline. <b>Lock</b> marks a lesion finished.</li>
<li>Long and short axes (mm), volume (mL) and sphericity are in <b>Measurements</b>; the axes are drawn as
lines. They are re-measured when you edit the segment in Segment Editor.</li></ol>
Runs on the GPU if there is one, else on the CPU (about 1 s per slice).
""")
        self.parent.acknowledgementText = _("""
OncoPilot reproduces ONCOPILOT: L. Machado et al. (Raidium), "ONCOPILOT: A Promptable CT Foundation Model
For Solid Tumor Evaluation", arXiv:2410.07908, 2024. It uses Segment Anything (Kirillov et al., Meta AI, 2023)
and LiteMedSAM / MedSAM (Ma et al., Nature Communications 2024). Please cite them when you publish results.
""")


#
# OncoPilotParameterNode
#


@parameterNodeWrapper
class OncoPilotParameterNode:
    """Scene state of the module, bound to the .ui by each widget's SlicerParameterName.

    inputVolume: the CT (HU). promptPoints: point list receiving clicks (world RAS). roi: box around a lesion.
    outputSegmentation: one segment per lesion. measurementTable: one row per lesion.
    model: OncoPilotLib registry name. device: "auto", "cuda", "cpu" or "mps".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    promptPoints: vtkMRMLMarkupsFiducialNode
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    measurementTable: vtkMRMLTableNode
    model: str = "litemedsam"
    device: str = "auto"


#
# OncoPilotWidget
#


class OncoPilotWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and runs model work on one persistent worker thread."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.worker = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pendingAction = None  # "new", "positive", "negative" or "box": what the next placed point does
        self._pendingSlices = []  # (k, (J, I) mask) progress not yet shown
        self._previewTarget = None  # (volume, segmentation, segment ID) shown while a job runs
        self._pendingRemeasure = set()
        self._shortcuts = []
        self._lastPrefetchSlice = None
        self._cpuNoticeShown = False

    # ---- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OncoPilot.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.modelComboBox.addItems(list(MODEL_CHOICES))
        self.ui.progressBar.hide()

        self.logic = OncoPilotLogic()
        self.logic.remeasureScheduler = self._scheduleRemeasure
        self.worker = Worker()
        self._pollTimer = self._timer(50, self._onPollTimer, singleShot=False)
        self._remeasureTimer = self._timer(400, self._remeasurePending, singleShot=True)

        self._connectButtons()
        self._createShortcuts()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(self._interactionNode(), slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent,
                         self._onInteractionModeChanged)
        if self._redSliceNode() is not None:  # no views when Slicer runs without its main window
            self.addObserver(self._redSliceNode(), vtk.vtkCommand.ModifiedEvent, self._onViewedSliceChanged)
        self.initializeParameterNode()

    @staticmethod
    def _timer(intervalMs: int, slot, singleShot: bool):
        timer = qt.QTimer()
        timer.setInterval(intervalMs)
        timer.setSingleShot(singleShot)
        timer.connect("timeout()", slot)
        return timer

    def _connectButtons(self) -> None:
        ui = self.ui
        ui.placePointButton.connect("clicked(bool)", lambda: self.onStartPlacing("new"))
        ui.drawBoxButton.connect("clicked(bool)", self.onDrawBox)
        ui.segmentRoiButton.connect("clicked(bool)", self.onSegmentRoi)
        ui.addPositivePointButton.connect("clicked(bool)", lambda: self.onStartPlacing("positive"))
        ui.addNegativePointButton.connect("clicked(bool)", lambda: self.onStartPlacing("negative"))
        ui.undoButton.connect("clicked(bool)", self.onUndo)
        ui.lockButton.connect("toggled(bool)", self.onLockToggled)
        ui.cancelButton.connect("clicked(bool)", self.onCancel)
        ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        ui.lesionComboBox.connect("currentIndexChanged(int)", lambda index: self._updateButtons())

    def _createShortcuts(self) -> None:
        """Single-key shortcuts, active only while the module is shown (see enter / exit)."""
        bindings = (("P", lambda: self.onStartPlacing("new")), ("B", self.onDrawBox),
                    ("+", lambda: self.onStartPlacing("positive")), ("=", lambda: self.onStartPlacing("positive")),
                    ("-", lambda: self.onStartPlacing("negative")), ("U", self.onUndo), ("Esc", self.onCancel))
        for keys, slot in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.setEnabled(False)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def cleanup(self) -> None:
        self.removeObservers()
        self._pollTimer.stop()
        self._remeasureTimer.stop()
        if self.worker is not None:
            self.worker.shutdown()
        if self.logic is not None:
            self.logic.removeObservers()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []

    def enter(self) -> None:
        self.initializeParameterNode()
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.worker.cancelAll()
        self.setParameterNode(None)
        self.logic.removeObservers()
        self.logic.resetSessions()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node -----------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        self.logic.model, self.logic.device = parameters.model, parameters.device
        self.logic.measurementTable = parameters.measurementTable
        self.ui.measurementTableView.setMRMLTableNode(parameters.measurementTable)
        if parameters.outputSegmentation:
            self.logic.observeSegmentation(parameters.outputSegmentation)
        self._refreshLesionList()
        self._updateButtons()
        self._prefetchForVolume()

    # ---- state of the buttons -----------------------------------------------------------------------------
    def _busy(self) -> bool:
        return self.worker is not None and self.worker.busy

    def _currentLesionId(self):
        return self.ui.lesionComboBox.currentData

    def _refreshLesionList(self) -> None:
        combo = self.ui.lesionComboBox
        current = combo.currentData
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for segmentId, name in self.logic.lesionChoices(self._parameterNode.outputSegmentation):
            combo.addItem(name, segmentId)
        index = combo.findData(current)
        combo.setCurrentIndex(index if index >= 0 else combo.count - 1)
        combo.blockSignals(wasBlocked)

    def _updateButtons(self) -> None:
        parameters, busy = self._parameterNode, self._busy()
        hasVolume = parameters is not None and parameters.inputVolume is not None
        segmentation = parameters.outputSegmentation if parameters else None
        lesionId = self._currentLesionId()
        editable = bool(hasVolume and lesionId and not busy and segmentation
                        and not self.logic.isLesionLocked(segmentation, lesionId))
        for button in (self.ui.placePointButton, self.ui.drawBoxButton, self.ui.segmentRoiButton):
            button.enabled = hasVolume and not busy
        self.ui.addPositivePointButton.enabled = editable
        self.ui.addNegativePointButton.enabled = editable
        self.ui.undoButton.enabled = editable and self.logic.canUndo(segmentation, lesionId)
        self.ui.lockButton.enabled = bool(lesionId and segmentation and not busy)
        wasBlocked = self.ui.lockButton.blockSignals(True)
        locked = bool(lesionId and segmentation and self.logic.isLesionLocked(segmentation, lesionId))
        self.ui.lockButton.checked = locked
        self.ui.lockButton.blockSignals(wasBlocked)
        self.ui.cancelButton.enabled = busy

    # ---- prompts ------------------------------------------------------------------------------------------
    def onStartPlacing(self, action: str) -> None:
        """Put the views in place mode; the next click becomes a new lesion or a correction."""
        if self._busy():
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start placing a point."), waitCursor=True):
            self._requireReady()
            if action != "new":
                self.logic.lesionRef(self._parameterNode.outputSegmentation, self._currentLesionId())
            pointList = self._promptPointList()
            self._pendingAction = action
            self._startPlaceMode(pointList)
            self._setStatus(_("Click on the lesion in a slice view.") if action == "new"
                            else _("Click where the outline should change."))

    def onDrawBox(self) -> None:
        if self._busy():
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start drawing a box."), waitCursor=True):
            self._requireReady()
            roi = self._parameterNode.roi
            if roi is None:
                roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", _("OncoPilot box"))
                self._parameterNode.roi = roi
            roi.RemoveAllControlPoints()
            self._pendingAction = "box"
            self._startPlaceMode(roi)
            self._setStatus(_("Drag a box around the lesion in an axial view."))

    def onSegmentRoi(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot segment the ROI."), waitCursor=True):
            self._requireReady()
            self._runNewLesion(self.logic.roiPrompt(self._parameterNode.inputVolume, self._parameterNode.roi))

    def _promptPointList(self):
        pointList = self._parameterNode.promptPoints
        if pointList is None:
            pointList = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", _("OncoPilot prompts"))
            self._parameterNode.promptPoints = pointList
        self.removeObserver(pointList, pointList.PointPositionDefinedEvent, self._onPointDefined)
        self.addObserver(pointList, pointList.PointPositionDefinedEvent, self._onPointDefined)
        return pointList

    def _startPlaceMode(self, markupsNode) -> None:
        slicer.modules.markups.logic().SetActiveList(markupsNode)
        interactionNode = self._interactionNode()
        interactionNode.SetPlaceModePersistence(0)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def _onPointDefined(self, pointList, event) -> None:
        action, self._pendingAction = self._pendingAction, None
        if action not in ("new", "positive", "negative"):
            return
        last = pointList.GetNumberOfControlPoints() - 1
        pointList.SetNthControlPointLabel(last, {"new": "L", "positive": "+", "negative": "-"}[action])
        with slicer.util.tryWithErrorDisplay(_("OncoPilot could not use this point."), waitCursor=True):
            if action == "new":
                self._runNewLesion(self.logic.pointPrompt(self._parameterNode.inputVolume, pointList))
            else:
                self._runEdit(lastControlPointRAS(pointList), positive=(action == "positive"))

    def _onInteractionModeChanged(self, interactionNode, event) -> None:
        # A box is complete when Slicer leaves place mode (its size is set by the drag, after the first point).
        if self._pendingAction != "box" or interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            return
        self._pendingAction = None
        roi = self._parameterNode.roi
        if roi is None or roi.GetNumberOfControlPoints() == 0:
            return
        with slicer.util.tryWithErrorDisplay(_("OncoPilot could not use this box."), waitCursor=True):
            self._runNewLesion(self.logic.roiPrompt(self._parameterNode.inputVolume, roi))

    # ---- jobs ---------------------------------------------------------------------------------------------
    def _requireReady(self) -> None:
        """Raise ValueError unless a CT is selected and the Python dependencies are present (asks to install)."""
        self.logic.checkInputVolume(self._parameterNode.inputVolume)
        if not dependencies.dependenciesReady():
            dependencies.ensureDependencies(askConfirmation=True)
        if not self._cpuNoticeShown:
            self._cpuNoticeShown = True
            notice = dependencies.deviceNotice(self._parameterNode.device)
            if notice:
                slicer.util.infoDisplay(notice, windowTitle=_("OncoPilot"))

    def _runNewLesion(self, prompt) -> None:
        volume = self._parameterNode.inputVolume
        segmentation = self.logic.prepareOutputSegmentation(volume, self._parameterNode.outputSegmentation)
        self._parameterNode.outputSegmentation = segmentation
        segmentId = self.logic.beginPreview(volume, segmentation, prompt)
        self._refreshLesionList()

        def done(lesion):
            self.logic.storeNewLesion(volume, segmentation, lesion, segmentId)
            self._showResult(segmentation, segmentId)

        def failed(error):
            self.logic.discardPreview(segmentation, segmentId)
            self._reportFailure(error)

        try:
            self._submit(_("Segmenting the lesion"), volume, lambda session, progress, cancel: session.segment(
                prompt, progress=progress, cancel=cancel), done, failed, (volume, segmentation, segmentId))
        except Exception:
            self.logic.discardPreview(segmentation, segmentId)
            raise

    def _runEdit(self, ras, positive: bool) -> None:
        volume, segmentation = self._parameterNode.inputVolume, self._parameterNode.outputSegmentation
        segmentId = self._currentLesionId()
        arguments = self.logic.beginEdit(volume, segmentation, segmentId, ras, positive)

        def done(lesion):
            self.logic.storeEditedLesion(volume, segmentation, segmentId, lesion)
            self._showResult(segmentation, segmentId)

        def failed(error):
            self.logic.abortEdit(volume, segmentation, segmentId)
            self._reportFailure(error)

        try:
            self._submit(_("Correcting the lesion"), volume, lambda session, progress, cancel: session.edit(
                **arguments, progress=progress, cancel=cancel), done, failed, (volume, segmentation, segmentId))
        except Exception:
            self.logic.abortEdit(volume, segmentation, segmentId)
            raise

    def _submit(self, title: str, volume, work, onDone, onError, previewTarget=None) -> None:
        """Run ``work(session, progress, cancel)`` on the worker thread, building the session there if needed.

        The session is looked up when the job starts (not now): a job queued behind "Preparing the CT" then
        finds the session that job built instead of building a second one.
        """
        volumeId, model, device = volume.GetID(), self.logic.model, self.logic.device
        inputs = self.logic.sessionInputs(volume) if self.logic.existingSession(volume) is None else None

        def function(progress, cancel):
            session = self.logic.sessionById(volumeId, model, device)
            if session is None:
                if inputs is None:
                    raise ValueError(_("The CT was reset meanwhile; click again."))
                session = self.logic.buildSession(*inputs, model=model, device=device)
                self.logic.storeSession(volumeId, session, model, device)  # a dict entry: no MRML, no Qt
            return work(session, progress, cancel)

        def onFinished():
            if self._previewTarget is not None and self._previewTarget is previewTarget:
                self._previewTarget = None
                self._pendingSlices = []
            self._onJobFinished()

        self._previewTarget = previewTarget or self._previewTarget
        self.worker.submit(Job(title, function, self._showProgress, onDone, onError, onFinished))
        self._setStatus(title + "...")
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.show()
        self._pollTimer.start()
        self._updateButtons()

    def _showProgress(self, event) -> None:
        if event.mask2d is not None:
            self._pendingSlices.append((event.slice_index, event.mask2d))
        self.ui.progressBar.setMaximum(max(1, event.total))
        self.ui.progressBar.setValue(event.done)

    def _onPollTimer(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("OncoPilot failed to show the result."), waitCursor=False):
            self.worker.dispatchPending()
            self._flushPreview()
        if not self._busy() and not self._pendingSlices:
            self._pollTimer.stop()

    def _flushPreview(self) -> None:
        # One segment write per timer tick, however many slices arrived: writing is the costly part.
        if self._pendingSlices and self._previewTarget is not None:
            volume, segmentation, segmentId = self._previewTarget
            self.logic.updatePreview(volume, segmentation, segmentId, self._pendingSlices)
        self._pendingSlices = []

    def _onJobFinished(self) -> None:
        if not self._busy():
            self.ui.progressBar.hide()
        self._refreshLesionList()
        self._updateButtons()

    def _showResult(self, segmentation, segmentId: str) -> None:
        """After a lesion was stored: select it, show its measurements and the table."""
        if self._parameterNode.measurementTable is None:
            self._parameterNode.measurementTable = self.logic.getMeasurementTable()
        self._selectLesion(segmentId)
        self._setStatus(self.logic.lesionSummary(segmentation, segmentId))

    def _reportFailure(self, error) -> None:
        if isCancellation(error):
            self._setStatus(_("Cancelled."))
            return
        self._setStatus("")
        logging.error("OncoPilot: %s", error, exc_info=error)
        slicer.util.errorDisplay(describeError(error), windowTitle=_("OncoPilot"))

    def onCancel(self) -> None:
        if self._busy():
            self.worker.cancelAll()
            self._setStatus(_("Cancelling after the current slice..."))
        elif self._pendingAction is not None:
            self._pendingAction = None
            self._interactionNode().SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.ViewTransform)

    # ---- undo, lock, dependencies -------------------------------------------------------------------------
    def onUndo(self) -> None:
        if self._busy() or not self._currentLesionId():
            return
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            self.logic.undoLesion(self._parameterNode.outputSegmentation, self._currentLesionId(),
                                  self._parameterNode.inputVolume)
        self._updateButtons()

    def onLockToggled(self, locked: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot change the lock."), waitCursor=False):
            self.logic.setLesionLocked(self._parameterNode.outputSegmentation, self._currentLesionId(), locked)
        self._updateButtons()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing OncoPilot's dependencies failed."), waitCursor=True):
            dependencies.ensureDependencies(askConfirmation=True)
            self._setStatus(_("Dependencies are installed."))
            self._prefetchForVolume()

    # ---- prefetch and re-measurement ----------------------------------------------------------------------
    def _prefetchForVolume(self) -> None:
        """Encode the viewed slices of the selected CT in the background (only once dependencies exist)."""
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is None or self._busy() or not dependencies.dependenciesReady():
            return
        try:
            self.logic.checkInputVolume(volume)
        except ValueError:
            return
        if self.logic.existingSession(volume) is None:
            self._submit(_("Preparing the CT"), volume, lambda session, progress, cancel: None,
                         lambda result: self._onViewedSliceChanged(), self._reportFailure)
        else:
            self._onViewedSliceChanged()

    def _onViewedSliceChanged(self, caller=None, event=None) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        session = self.logic.existingSession(volume) if volume is not None else None
        if session is None or self._redSliceNode() is None:
            return
        sliceToRAS = self._redSliceNode().GetSliceToRAS()
        k = self.logic.sliceIndexAtRAS(volume, [sliceToRAS.GetElement(row, 3) for row in range(3)])
        if k is not None and k != self._lastPrefetchSlice:
            self._lastPrefetchSlice = k
            session.prefetch_around(k)

    def _scheduleRemeasure(self, segmentationNode, segmentId: str) -> None:
        self._pendingRemeasure.add((segmentationNode.GetID(), segmentId))
        self._remeasureTimer.start()  # restarts: measure once the user pauses painting

    def _remeasurePending(self) -> None:
        pending, self._pendingRemeasure = self._pendingRemeasure, set()
        for segmentationId, segmentId in pending:
            segmentationNode = slicer.mrmlScene.GetNodeByID(segmentationId)
            if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
                continue
            with slicer.util.tryWithErrorDisplay(_("Re-measuring the lesion failed."), waitCursor=True):
                self.logic.remeasureSegment(segmentId, segmentationNode)

    # ---- small helpers ------------------------------------------------------------------------------------
    def _selectLesion(self, segmentId: str) -> None:
        self._refreshLesionList()
        index = self.ui.lesionComboBox.findData(segmentId)
        if index >= 0:
            self.ui.lesionComboBox.setCurrentIndex(index)

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    @staticmethod
    def _interactionNode():
        return slicer.app.applicationLogic().GetInteractionNode()

    @staticmethod
    def _redSliceNode():
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager is not None else None
        return sliceWidget.mrmlSliceNode() if sliceWidget is not None else None


#
# OncoPilotLogic
#


class OncoPilotLogic(ScriptedLoadableModuleLogic, OncoPilotSceneLogic):
    """Scene logic (see OncoPilotSlicer.logic.OncoPilotSceneLogic) plus the module's parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        OncoPilotSceneLogic.__init__(self)

    def getParameterNode(self):
        return OncoPilotParameterNode(super().getParameterNode())


#
# OncoPilotTest
#


class OncoPilotTest(ScriptedLoadableModuleTest):
    """Runs the self-test shared with pytest (OncoPilotSlicer/selftest.py) on Slicer's scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from OncoPilotSlicer.selftest import defaultDataDir, runSelfTest

        self.setUp()
        report = runSelfTest(slicer.mrmlScene, defaultDataDir(), logic=OncoPilotLogic())
        self.delayDisplay(_("OncoPilot self-test passed: {checks}").format(checks=", ".join(report["passed"])))
        for skipped in report["skipped"]:
            logging.warning("OncoPilot self-test: %s", skipped)
