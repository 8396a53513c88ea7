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
4. Thin objects get a narrower blur. Step 2 needs the blurred field to rise well above the level, which fails
   when the object is thinner than the blur: a one-slice mask blurred at 1.5 slices peaks at 0.26, no level in
   [0.3, 0.7] encloses its volume, the bisection stuck at 0.3 and the area came out far too small (sphericity
   1.78 for a 10 x 10 pixel square at 1 mm, 1294 for a single voxel). So along each axis the blur is at most
   the object's mean thickness along it / ``THICKNESS_PER_SIGMA`` (4: a slab then peaks at erf(sqrt 2) = 0.95,
   a ball at 0.97), and such an axis is refined (each voxel split into equal sub-voxels, the same union of
   boxes) so that the blur still spans 1.5 sampled voxels, the sampling of step 3. Objects at least 6 voxels
   thick along every axis (balls of radius >= 4.5 voxels, 30 of the 32 real lesions) are unchanged; the two
   LIDC nodules (8 and 7 slices of 2.5 mm) went from 0.948 and 0.944 to 0.941 and 0.934. What comes out for
   degenerate masks: a one-slice mask is a slab one slice thick with rounded rims (1 x 40 x 40 voxels: 1.04 ..
   1.09 times the box's own sphericity at 1 x 1 x 1 .. 1 x 1 x 5 mm), a single voxel a rounded box (1.0 when
   isotropic, 0.83 at 0.7 x 0.7 x 2.5 mm, the box itself 0.69).
5. The area is floored at the area of the sphere of the same volume, the least area any closed surface
   enclosing that volume can have (isoperimetric inequality), so sphericity is at most 1. Only the
   quadrature's error (step 3) hits the floor: up to 2 % low on near-spherical shapes (300 random blobs of
   1 .. 405 voxels peaked at sphericity 1.014 before it, voxelised spheres at 1.019).

Measured on voxelised spheres and ellipsoids with radii of 5 to 12 voxels at 0.7 x 0.7 x 2.5, 1 x 1 x 5,
0.6 x 0.9 x 2.5 and 1 x 1 x 1 mm: sphericity within -0.014 .. +0.019 of the analytic value (Thomsen's
ellipsoid area); the floor (step 5) only turns the spheres' 1.00 .. 1.019 into 1.0. Volume for sphericity
is the voxel-count volume, as everywhere in OncoPilot.
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
# The blur along an axis is at most the object's mean thickness along it divided by this (module docstring).
THICKNESS_PER_SIGMA = 4.0
_BISECTION_STEPS = 30
# Refinement of thin objects stops before the padded, refined crop exceeds this many voxels (64 MB float32).
_MAX_REFINED_VOXELS = 1 << 24
# Blurred values within this of 0 or 1 are treated as fully outside or inside.
_BAND_EPS = 1e-4


def smoothed_surface_area_mm2(mask_kji: np.ndarray, spacing_xyz) -> float:
    """Area (mm^2) of the smoothed, volume-preserving isosurface of a binary mask.

    Args:
        mask_kji: (K, J, I) boolean array, already cropped or not (it is cropped and padded here).
        spacing_xyz: (sx, sy, sz) voxel size in mm along i, j, k.

    Returns:
        The area in mm^2, never below that of the sphere of the voxel-count volume; 0.0 for an empty mask.
    """
    mask = np.asarray(mask_kji, dtype=bool)
    n_voxels = int(np.count_nonzero(mask))
    if n_voxels == 0:
        return 0.0
    spacing_kji = np.asarray(spacing_xyz, dtype=float)[::-1]
    mask = mask[ndimage.find_objects(mask.astype(np.uint8))[0]]
    factors, sigma = _refinement(mask)
    crop = _padded(_refine(mask, factors), sigma)
    fine_spacing = spacing_kji / factors
    phi = ndimage.gaussian_filter(crop, sigma, mode="constant", truncate=4.0)
    band, grad_norm = _band_and_gradient(crop, phi, fine_spacing, sigma)
    fully_inside = int(np.count_nonzero(phi >= 1.0 - _BAND_EPS))
    level = _volume_preserving_level(band, n_voxels * int(np.prod(factors)) - fully_inside)
    area = float(np.sum(_smoothed_delta(band - level) * grad_norm) * np.prod(fine_spacing))
    return max(area, sphere_area_mm2(n_voxels * float(np.prod(spacing_kji))))


def sphere_area_mm2(volume_mm3: float) -> float:
    """Area of the sphere of volume ``volume_mm3``: the least area of any closed surface enclosing it."""
    return float((36.0 * math.pi * volume_mm3 ** 2) ** (1.0 / 3.0))


def sphericity(volume_mm3: float, area_mm2: float) -> float | None:
    """Sphericity pi^(1/3) (6 V)^(2/3) / A in (0, 1] (1.0 for a sphere); None when the area is zero.

    Capped at 1.0: by the isoperimetric inequality no surface enclosing V has less area than the sphere, so a
    ratio above 1 can only be rounding (the area from :func:`smoothed_surface_area_mm2` is already floored).
    """
    if area_mm2 <= 0.0:
        return None
    return min(1.0, float(math.pi ** (1.0 / 3.0) * (6.0 * volume_mm3) ** (2.0 / 3.0) / area_mm2))


def _refinement(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (k, j, i) integer refinement factors and the blur sigma in refined voxels.

    The blur along an axis is ``SIGMA_VOXELS`` original voxels, or ``thickness / THICKNESS_PER_SIGMA`` where
    the object is thinner: its mean chord along that axis (voxel count / projected area; 1 for a one-slice
    mask, 4 R / 3 for a ball). Such an axis is refined (each voxel split into f, np.repeat) so that the blur
    spans at least ``SIGMA_VOXELS`` refined voxels, the sampling the delta quadrature was validated at.
    """
    thickness = np.array([np.count_nonzero(mask) / np.count_nonzero(mask.any(axis=axis)) for axis in range(3)])
    sigma = np.minimum(SIGMA_VOXELS, thickness / THICKNESS_PER_SIGMA)
    factors = np.ceil(SIGMA_VOXELS / sigma - 1e-9).astype(int)
    pad = np.ceil(4.0 * np.maximum(SIGMA_VOXELS, sigma * factors)) + 2
    # Only objects thin along every axis yet large (a 1-voxel shell) reach the budget; they get a coarser blur.
    while np.prod(np.array(mask.shape) * factors + 2 * pad) > _MAX_REFINED_VOXELS and factors.max() > 1:
        factors[int(np.argmax(factors))] -= 1
    return factors, np.maximum(SIGMA_VOXELS, sigma * factors)


def _refine(mask: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Split each voxel into factors[0] x factors[1] x factors[2] sub-voxels: the same union of boxes."""
    for axis, factor in enumerate(factors):
        if factor > 1:
            mask = np.repeat(mask, int(factor), axis=axis)
    return mask


def _padded(mask: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Pad by 4 sigma + 2 voxels per axis so the blur fits (float32)."""
    pad = [(int(p), int(p)) for p in np.ceil(4.0 * sigma) + 2]
    return np.pad(mask, pad).astype(np.float32)


def _band_and_gradient(crop: np.ndarray, phi: np.ndarray, spacing_kji: np.ndarray,
                       sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of phi and |grad phi| (per mm) on the voxels where the level set can lie.

    The gradient is the exact derivative of the blurred field (Gaussian-derivative filter): central
    differences of phi underestimate it, by 7 % at sigma = 1.5 voxels (0.248 vs 0.266 per voxel at an edge).
    """
    in_band = (phi > _BAND_EPS) & (phi < 1.0 - _BAND_EPS)
    squared = np.zeros(int(np.count_nonzero(in_band)))
    for axis, step in enumerate(spacing_kji):
        order = [0, 0, 0]
        order[axis] = 1
        derivative = ndimage.gaussian_filter(crop, sigma, order=order, mode="constant", truncate=4.0)
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
