"""Surface area of a binary mask through a smoothed, volume-preserving isosurface (no mesh, no scikit-image).

Why not the voxel faces or plain marching cubes: both measure the staircase. Measured on voxelised spheres:
radius 10 voxels at 1 mm isotropic scores sphericity 0.67 with voxel faces and 0.92 with pyradiomics 3.0.1's
unsmoothed marching cubes; radius 12.5 mm at 0.7 x 0.7 x 2.5 mm scores 0.85 with pyradiomics. Slicer's
smoothed closed surface gives about 0.99 (reported in the issue). Sphericity must describe the lesion, not
the slice thickness, so we measure a smoothed surface (this module: 1.00 on both spheres).

What we compute instead:

1. Blur the (cropped, zero-padded) mask with a Gaussian of ``SIGMA_VOXELS`` = 1.5 voxels along each axis.
   This removes the grid-frequency staircase (transfer at the Nyquist period exp(-pi^2 sigma^2 / 2) = 1.5e-5)
   and keeps shapes larger than a few voxels.
2. A Gaussian blur shrinks convex shapes: the 0.5 level of a blurred ball of radius R lies about
   sigma^2 / R inside it (0.45 voxel, 17 % less area, for R = 5 voxels). So we do not take the 0.5 level
   but the level c whose enclosed volume equals the voxel-count volume (found by bisection): a
   volume-preserving smoothed surface, in the spirit of Slicer's windowed-sinc smoothing.
3. Its area comes from the coarea formula, A = integral |grad phi| delta(phi - c) dV, with a cosine-smoothed
   delta of half-width ``DELTA_HALF_WIDTH`` = 0.3 in phi units and the exact gradient of the blurred field
   (Gaussian-derivative filters). The delta spans 2.5 voxels at sigma = 1.5. At sigma = 1 it spans 1.7 voxels
   and the area came out 4 % low on voxelised spheres: their flat facets put the level exactly midway between
   samples, the worst case of the quadrature.

Measured on voxelised spheres and ellipsoids with radii of 5 to 12 voxels at 0.7 x 0.7 x 2.5, 1 x 1 x 5,
0.6 x 0.9 x 2.5 and 1 x 1 x 1 mm: sphericity within -0.014 .. +0.019 of the analytic value (Thomsen's
ellipsoid area). Volume for sphericity is the voxel-count volume, as everywhere in OncoPilot.
The grid axes are assumed orthogonal (true for any CT that io.read_volume accepts).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# Gaussian sigma along each axis, in voxels of that axis (see the module docstring).
SIGMA_VOXELS = 1.5
# Half-width of the smoothed delta, in units of the blurred mask (0..1).
DELTA_HALF_WIDTH = 0.3
_BISECTION_STEPS = 30
# Blurred values within this of 0 or 1 are treated as fully outside or inside.
_BAND_EPS = 1e-4


def smoothed_surface_area_mm2(mask_kji: np.ndarray, spacing_xyz) -> float:
    """Area (mm^2) of the smoothed, volume-preserving isosurface of a binary mask.

    Args:
        mask_kji: (K, J, I) boolean array, already cropped or not (it is cropped and padded here).
        spacing_xyz: (sx, sy, sz) voxel size in mm along i, j, k.

    Returns:
        The area in mm^2; 0.0 for an empty mask.
    """
    mask = np.asarray(mask_kji, dtype=bool)
    n_voxels = int(np.count_nonzero(mask))
    if n_voxels == 0:
        return 0.0
    spacing_kji = np.asarray(spacing_xyz, dtype=float)[::-1]
    crop = _padded_crop(mask)
    phi = ndimage.gaussian_filter(crop, SIGMA_VOXELS, mode="constant", truncate=4.0)
    band, grad_norm = _band_and_gradient(crop, phi, spacing_kji)
    fully_inside = int(np.count_nonzero(phi >= 1.0 - _BAND_EPS))
    level = _volume_preserving_level(band, n_voxels - fully_inside)
    weights = _smoothed_delta(band - level)
    return float(np.sum(weights * grad_norm) * np.prod(spacing_kji))


def sphericity(volume_mm3: float, area_mm2: float) -> float | None:
    """Sphericity pi^(1/3) (6 V)^(2/3) / A (1.0 for a sphere); None when the area is zero."""
    if area_mm2 <= 0.0:
        return None
    return float(math.pi ** (1.0 / 3.0) * (6.0 * volume_mm3) ** (2.0 / 3.0) / area_mm2)


def _padded_crop(mask: np.ndarray) -> np.ndarray:
    """Crop to the bounding box and pad by 4 sigma + 2 voxels so the blur fits (float32)."""
    pad = int(math.ceil(4.0 * SIGMA_VOXELS)) + 2
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return np.pad(mask[box], pad).astype(np.float32)


def _band_and_gradient(crop: np.ndarray, phi: np.ndarray, spacing_kji: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of phi and |grad phi| (per mm) on the voxels where the level set can lie.

    The gradient is the exact derivative of the blurred field (Gaussian-derivative filter): central
    differences of phi underestimate it, by 7 % at sigma = 1.5 voxels (0.248 vs 0.266 per voxel at an edge).
    """
    in_band = (phi > _BAND_EPS) & (phi < 1.0 - _BAND_EPS)
    squared = np.zeros(int(np.count_nonzero(in_band)))
    for axis, step in enumerate(spacing_kji):
        order = [0, 0, 0]
        order[axis] = 1
        derivative = ndimage.gaussian_filter(crop, SIGMA_VOXELS, order=order, mode="constant", truncate=4.0)
        squared += (derivative[in_band].astype(np.float64) / step) ** 2
    return phi[in_band].astype(np.float64), np.sqrt(squared)


def _smoothed_heaviside(x: np.ndarray) -> np.ndarray:
    w = DELTA_HALF_WIDTH
    inside = 0.5 * (1.0 + x / w + np.sin(np.pi * x / w) / np.pi)
    return np.where(x <= -w, 0.0, np.where(x >= w, 1.0, inside))


def _smoothed_delta(x: np.ndarray) -> np.ndarray:
    w = DELTA_HALF_WIDTH
    return np.where(np.abs(x) < w, (1.0 + np.cos(np.pi * x / w)) / (2.0 * w), 0.0)


def _volume_preserving_level(band: np.ndarray, band_voxels: float) -> float:
    """Level c in [w, 1 - w] whose smoothed volume over the band values equals ``band_voxels``.

    The voxels with phi ~ 1 count fully for any such c and were subtracted by the caller.
    """
    low, high = DELTA_HALF_WIDTH, 1.0 - DELTA_HALF_WIDTH
    for _ in range(_BISECTION_STEPS):
        level = 0.5 * (low + high)
        if float(np.sum(_smoothed_heaviside(band - level))) > band_voxels:
            low = level
        else:
            high = level
    return 0.5 * (low + high)
