"""Volume nodes as numpy: HU array (K, J, I), voxel <-> world geometry, prompts from markups.

Coordinates: "RAS" here is Slicer's world RAS in mm, i.e. after the volume's parent transforms. The geometry
handed to OncoPilotLib maps voxel indices (i, j, k) of ``arrayFromVolume`` straight to world RAS, so prompts
placed in the views and measurements drawn back into them need no further transform.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from OncoPilotLib.geometry import VolumeGeometry


def checkCtVolume(volumeNode) -> None:
    """Raise ValueError, in words a radiologist reads, unless ``volumeNode`` is a grey-level image with voxels."""
    if volumeNode is None:
        raise ValueError("No CT volume is selected. Choose the CT series in 'Input volume' first.")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{volumeNode.GetName()}' is a label map (an outline), not a CT image. "
                         "Choose the CT series in 'Input volume'.")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLVectorVolumeNode"):
        raise ValueError(f"'{volumeNode.GetName()}' is not a grey-level CT image (e.g. it is a colour image).")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise ValueError(f"'{volumeNode.GetName()}' holds no image data yet; wait until it has finished loading.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"'{volumeNode.GetName()}' is not a grey-level CT image (it has "
                         f"{imageData.GetNumberOfScalarComponents()} values per voxel).")


def parentToWorldMatrix(node) -> np.ndarray:
    """(4, 4) matrix from the node's local RAS to world RAS; identity without a parent transform.

    Raises:
        ValueError: the node sits under a non-linear (warping) transform, which no 4x4 matrix describes.
    """
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise ValueError(f"'{node.GetName()}' is moved by a non-linear (warping) transform "
                         f"('{transformNode.GetName()}'). Harden the transform on the volume first "
                         "(Data module: right-click the transform > Harden transform).")
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volumeGeometry(volumeNode) -> VolumeGeometry:
    """Voxel grid of ``volumeNode``: ijk_to_ras maps (i, j, k, 1) to world RAS mm; shape_kji as arrayFromVolume."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToWorld = parentToWorldMatrix(volumeNode) @ slicer.util.arrayFromVTKMatrix(matrix)
    dimensions = volumeNode.GetImageData().GetDimensions()
    return VolumeGeometry(ijkToWorld, (int(dimensions[2]), int(dimensions[1]), int(dimensions[0])))


def volumeArrayHU(volumeNode) -> np.ndarray:
    """(K, J, I) copy of the voxel values (HU for CT), detached from VTK memory so a worker thread may read it."""
    return np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)


def rasToIJK(geometry: VolumeGeometry, ras) -> np.ndarray:
    """World RAS mm (3,) -> continuous voxel indices (i, j, k)."""
    return geometry.ras_to_ijk_points(np.asarray(ras, dtype=float).reshape(3))


def ijkToRAS(geometry: VolumeGeometry, ijk) -> np.ndarray:
    """Voxel indices (i, j, k), float allowed -> world RAS mm (3,)."""
    return geometry.ijk_to_ras_points(np.asarray(ijk, dtype=float).reshape(3))


def voxelAtRAS(geometry: VolumeGeometry, ras, what: str = "The point") -> tuple[int, int, int]:
    """Nearest voxel (i, j, k) to a world RAS point; ValueError if it lies outside the volume."""
    ijk = rasToIJK(geometry, ras)
    if not geometry.contains_ijk(ijk):
        raise ValueError(f"{what} at R {ras[0]:.1f}, A {ras[1]:.1f}, S {ras[2]:.1f} mm lies outside the CT volume. "
                         "Click inside the image.")
    upper = np.array(geometry.shape_kji[::-1]) - 1
    return tuple(int(v) for v in np.clip(np.rint(ijk), 0, upper))


def lastControlPointRAS(markupsNode) -> np.ndarray:
    """World RAS of the most recently added control point of a markups node."""
    if markupsNode is None or markupsNode.GetNumberOfControlPoints() == 0:
        raise ValueError("No point has been placed yet. Click 'Place point' and then click on the lesion.")
    ras = np.zeros(3)
    markupsNode.GetNthControlPointPositionWorld(markupsNode.GetNumberOfControlPoints() - 1, ras)
    return ras


def roiCornersRAS(roiNode) -> np.ndarray:
    """(8, 3) world RAS corners of a markups ROI box."""
    if roiNode is None or roiNode.GetNumberOfControlPoints() == 0:
        raise ValueError("No box has been drawn yet. Click 'Draw box' and drag a box around the lesion.")
    bounds = [0.0] * 6
    roiNode.GetRASBounds(bounds)
    return np.array([[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])


def roiVoxelRange(geometry: VolumeGeometry, roiNode) -> tuple[np.ndarray, np.ndarray]:
    """(ijk_min, ijk_max) integer voxel indices (inclusive) of the part of the ROI inside the volume."""
    corners = geometry.ras_to_ijk_points(roiCornersRAS(roiNode))
    upper = np.array(geometry.shape_kji[::-1]) - 1
    low = np.ceil(corners.min(axis=0) - 0.5)
    high = np.floor(corners.max(axis=0) + 0.5)
    if np.any(high < 0) or np.any(low > upper):
        raise ValueError("The box lies outside the CT volume. Draw it around the lesion, inside the image.")
    return np.clip(low, 0, upper).astype(int), np.clip(high, 0, upper).astype(int)


def sliceIndexAtRAS(geometry: VolumeGeometry, ras) -> int | None:
    """Axial slice k nearest to a world RAS point (e.g. the centre of the viewed slice), None if outside."""
    k = int(np.rint(rasToIJK(geometry, ras)[2]))
    return k if 0 <= k < geometry.shape_kji[0] else None
