"""A headless Slicer scene on slicer-core (the MRML, logic and slicer.util parts of Slicer, without Qt).

``newScene()`` sets ``slicer.mrmlScene`` to a fresh vtkMRMLScene with an application logic and the module
logics that OncoPilot's Logic and ``slicer.util`` reach for (Colors, Volumes, Markups, Segmentations, Tables,
Transforms), and makes ``slicer.modules.<name>.logic()`` resolve as in the application. The segmentations
logic is created before any segmentation node so that its converter rules (labelmap <-> closed surface) exist.
Nothing here fakes MRML: every node, logic and converter is Slicer's own compiled code.
"""

from __future__ import annotations

import types

import slicer

# Module name as Slicer registers it -> the logic class slicer-core provides for it.
_MODULE_LOGICS = (
    ("Colors", "vtkSlicerColorLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Transforms", "vtkSlicerTransformLogic"),
)


class _ModuleHandle:
    """What ``slicer.modules.<name>`` offers the code under test: ``logic()`` and ``name``."""

    def __init__(self, name: str, logic):
        self.name = name
        self._logic = logic

    def logic(self):
        return self._logic


def _registerConverterRules() -> None:
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    existing = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for className in ("vtkBinaryLabelmapToClosedSurfaceConversionRule",
                      "vtkClosedSurfaceToBinaryLabelmapConversionRule"):
        if className not in existing:
            factory.RegisterConverterRule(getattr(slicer, className)())


def newScene():
    """Make a fresh ``slicer.mrmlScene`` with its application and module logics; returns the scene."""
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    handles = {}
    for moduleName, className in _MODULE_LOGICS:
        logic = getattr(slicer, className)()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(moduleName, logic)
        handles[moduleName.lower()] = _ModuleHandle(moduleName, logic)
    _registerConverterRules()
    slicer.mrmlScene = scene
    slicer.app = None
    slicer.modules = types.SimpleNamespace(**handles)
    slicer._oncopilotAppLogic = appLogic  # keep the application logic alive as long as the scene
    return scene


def loadVolume(path, name: str | None = None):
    """Read a volume file with Slicer's own reader (vtkSlicerVolumesLogic), as File > Add Data would."""
    from pathlib import Path

    name = name or Path(path).name.split(".")[0]
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, 0)
    if node is None:
        raise RuntimeError(f"Slicer could not read {path}")
    return node
