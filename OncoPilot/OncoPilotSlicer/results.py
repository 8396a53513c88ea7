"""Measurements into the scene: one table row and two locked axis lines (long, short) per lesion.

Endpoints come from OncoPilotLib's ``LesionMeasurement`` in world RAS mm (the geometry given to
``measure_lesion`` already includes the volume's parent transforms), so the line nodes need no transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer
import vtk

# (column name, VTK array class): the measurement table's columns, in order.
TABLE_COLUMNS = (
    ("Lesion", vtk.vtkStringArray),
    ("Long axis (mm)", vtk.vtkDoubleArray),
    ("Short axis (mm)", vtk.vtkDoubleArray),
    ("Volume (mL)", vtk.vtkDoubleArray),
    ("Sphericity", vtk.vtkDoubleArray),
    ("Slices", vtk.vtkIntArray),
    ("Mode", vtk.vtkStringArray),
    ("Model", vtk.vtkStringArray),
)


@dataclass
class MeasurementRow:
    """One table row: lengths in mm, volume in mL, sphericity in (0, 1] (NaN when undefined)."""

    lesion: str
    longAxisMm: float
    shortAxisMm: float
    volumeMl: float
    sphericity: float
    slices: int
    mode: str
    model: str

    @classmethod
    def fromMeasurement(cls, name: str, measurement, mode: str, model: str) -> "MeasurementRow":
        sphericity = measurement.sphericity if measurement.sphericity is not None else float("nan")
        return cls(name, float(measurement.long_axis_mm), float(measurement.short_axis_mm),
                   float(measurement.volume_ml), float(sphericity), int(measurement.n_slices), mode, model)

    def values(self) -> tuple:
        return (self.lesion, self.longAxisMm, self.shortAxisMm, self.volumeMl, self.sphericity, self.slices,
                self.mode, self.model)


def fillTable(tableNode, rows: list[MeasurementRow]) -> None:
    """Replace the table's content by ``rows`` under the columns of TABLE_COLUMNS."""
    wasModifying = tableNode.StartModify()
    tableNode.RemoveAllColumns()
    for index, (name, arrayClass) in enumerate(TABLE_COLUMNS):
        column = arrayClass()
        column.SetName(name)
        for row in rows:
            value = row.values()[index]
            column.InsertNextValue(value)
        tableNode.AddColumn(column)
    tableNode.SetUseColumnNameAsColumnHeader(True)
    tableNode.EndModify(wasModifying)


def tableRows(tableNode) -> list[dict]:
    """The table as a list of {column name: value} dicts (for tests and scripts)."""
    table = tableNode.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        rows.append({table.GetColumn(c).GetName(): table.GetColumn(c).GetValue(r)
                     for c in range(table.GetNumberOfColumns())})
    return rows


def axisLineNode(lineId: str | None, name: str, color) -> "slicer.vtkMRMLMarkupsLineNode":
    """The existing line node with ID ``lineId``, or a new locked one named ``name``."""
    node = slicer.mrmlScene.GetNodeByID(lineId) if lineId else None
    if node is None or not node.IsA("vtkMRMLMarkupsLineNode"):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name)
        node.CreateDefaultDisplayNodes()
    node.SetName(name)
    node.SetLocked(True)
    displayNode = node.GetDisplayNode()
    if displayNode is not None:
        displayNode.SetSelectedColor(*color)
        displayNode.SetColor(*color)
    return node


def setLineEndpoints(lineNode, endpointsRAS: np.ndarray) -> None:
    """Place a line's two control points at (2, 3) world RAS mm."""
    wasModifying = lineNode.StartModify()
    lineNode.RemoveAllControlPoints()
    for point in np.asarray(endpointsRAS, dtype=float).reshape(2, 3):
        lineNode.AddControlPointWorld(vtk.vtkVector3d(*point))
    lineNode.EndModify(wasModifying)


def lineEndpointsRAS(lineNode) -> np.ndarray:
    """(2, 3) world RAS of a line's control points."""
    return slicer.util.arrayFromMarkupsControlPoints(lineNode, world=True)


def removeNodeById(nodeId: str | None) -> None:
    node = slicer.mrmlScene.GetNodeByID(nodeId) if nodeId else None
    if node is not None:
        slicer.mrmlScene.RemoveNode(node)
