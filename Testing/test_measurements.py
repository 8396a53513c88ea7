"""Exactness tests of OncoPilotLib.measurements on voxelised shapes with closed-form answers, plus the real
lesions of ../shared/data (manifest agreement), a pyradiomics cross-check and the ``measure`` CLI."""

from __future__ import annotations

import csv
import json
import math
from functools import lru_cache

import numpy as np
import pytest

from OncoPilotLib import io
from OncoPilotLib.cli import main
from OncoPilotLib.geometry import VolumeGeometry
from OncoPilotLib.measurements import LesionMeasurement, measure_lesion

SPACINGS = [(0.7, 0.7, 2.5), (1.0, 1.0, 5.0), (0.6, 0.9, 2.5)]
# Sub-voxel centre offsets (voxels along i, j, k) so that no shape is symmetric on the grid.
OFFSET = (0.31, 0.17, 0.0)


def ellipsoid(radii_mm, spacing, angle_deg: float = 0.0, offset=OFFSET, margin: int = 3):
    """(K, J, I) voxelised ellipsoid (voxel centre inside), semi-axes (a, b, c) mm with a, b rotated in-plane by
    ``angle_deg`` about the slice normal; the centre sits ``offset`` voxels from a voxel centre, on slice K // 2."""
    extent = max(radii_mm[0], radii_mm[1])
    half = [int(math.ceil(extent / spacing[0])) + margin, int(math.ceil(extent / spacing[1])) + margin,
            int(math.ceil(radii_mm[2] / spacing[2])) + margin]
    x, y, z = ((np.arange(-n, n + 1) - o) * s for n, o, s in zip(half, offset, spacing))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    u, v = cos * xx + sin * yy, -sin * xx + cos * yy
    mask = (u / radii_mm[0]) ** 2 + (v / radii_mm[1]) ** 2 + (zz / radii_mm[2]) ** 2 <= 1.0
    return mask.astype(np.uint8), VolumeGeometry.from_spacing(spacing, mask.shape)


def thomsen_area(a: float, b: float, c: float, p: float = 1.6075) -> float:
    """Knud Thomsen's ellipsoid surface approximation (relative error <= 1.061 %)."""
    return 4.0 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3.0) ** (1.0 / p)


def analytic_sphericity(a: float, b: float, c: float) -> float:
    volume = 4.0 / 3.0 * math.pi * a * b * c
    return math.pi ** (1.0 / 3.0) * (6.0 * volume) ** (2.0 / 3.0) / thomsen_area(a, b, c)


def pixel(spacing) -> float:
    return max(spacing[0], spacing[1])


def unit(segment: np.ndarray) -> np.ndarray:
    vector = segment[1] - segment[0]
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("angle", [0.0, 23.0, 45.0, 71.0])
def test_rotated_ellipse_axes(spacing, angle):
    a, b = 40 * spacing[0], 22 * spacing[0]
    mask, geometry = ellipsoid((a, b, 3 * spacing[2]), spacing, angle)
    m = measure_lesion(mask, geometry)
    assert abs(m.long_axis_mm - 2 * a) <= pixel(spacing)
    assert abs(m.short_axis_mm - 2 * b) <= pixel(spacing)
    assert m.long_axis_slice == mask.shape[0] // 2
    major = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle)), 0.0])
    # A diameter tilted by theta is 2a (1 - (a^2/b^2 - 1) theta^2 / 2) long: one pixel of length buys a tilt of
    # 1 / sqrt(40 (40^2/22^2 - 1)) = 0.104 rad = 6.0 degrees, and voxel centres lose up to a pixel at the tips.
    assert abs(unit(m.long_axis_ras) @ major) >= math.cos(math.radians(6.5))
    assert abs(unit(m.long_axis_ras) @ unit(m.short_axis_ras)) < 1e-9
    assert np.all(m.long_axis_ras[:, 2] == m.long_axis_ras[0, 2])
    assert m.short_axis_mm <= m.long_axis_mm


def perpendicular_diameter(a: float, b: float, angle_deg: float, direction: np.ndarray) -> float:
    """Length of the ellipse's diameter along ``direction`` (RAS unit vector, in-plane)."""
    theta = math.atan2(direction[1], direction[0]) - math.radians(angle_deg)
    return 2 * a * b / math.hypot(b * math.cos(theta), a * math.sin(theta))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_random_ellipses_error_bounds(spacing):
    """40 random ellipses per spacing (semi-axes 8-40 pixels, any angle, any sub-voxel centre). Voxel centres
    lie inside the ellipse, so the long axis never exceeds 2a; on an axis-aligned tip it loses up to 1.12
    pixels (measured). The edge-to-edge short axis stays within one pixel of the analytic diameter along
    its own (exactly perpendicular) direction."""
    rng = np.random.default_rng(20260)
    errors = []
    for _ in range(40):
        a = rng.uniform(8, 40) * spacing[0]
        b = rng.uniform(0.4, 1.0) * a
        angle = rng.uniform(0.0, 180.0)
        mask, geometry = ellipsoid((a, b, 3 * spacing[2]), spacing, angle, (*rng.uniform(-0.5, 0.5, 2), 0.0))
        m = measure_lesion(mask, geometry)
        analytic_short = perpendicular_diameter(a, b, angle, unit(m.short_axis_ras))
        assert m.short_axis_mm <= m.long_axis_mm
        errors.append(((m.long_axis_mm - 2 * a) / pixel(spacing), (m.short_axis_mm - analytic_short) / pixel(spacing)))
    errors = np.array(errors)
    assert errors[:, 0].max() <= 1e-9 and errors[:, 0].min() >= -1.25
    assert np.abs(errors[:, 1]).max() <= 1.0
    assert np.abs(errors).mean(axis=0).max() <= 0.5


def assert_segment_inside(mask: np.ndarray, ends_ijk: np.ndarray, tolerance: float = 1e-6) -> None:
    """Every point of the segment has a bilinearly interpolated in-slice mask value >= 0.5 (our 'inside')."""
    from scipy import ndimage

    samples = np.linspace(ends_ijk[0], ends_ijk[1], 400)
    k = int(ends_ijk[0, 2])
    values = ndimage.map_coordinates(mask[k].astype(float), [samples[:, 1], samples[:, 0]], order=1)
    assert values.min() >= 0.5 - tolerance


@pytest.mark.parametrize("spacing", SPACINGS)
def test_short_axis_of_overlapping_discs(spacing):
    """Two overlapping discs (a peanut, long axis through both centres): the short axis is a disc diameter,
    not the waist, and it lies inside."""
    radius = 15 * spacing[0]
    left, geometry = ellipsoid((radius, radius, 2 * spacing[2]), spacing, offset=(8.31, 0.17, 0.0), margin=12)
    right, _ = ellipsoid((radius, radius, 2 * spacing[2]), spacing, offset=(-7.69, 0.17, 0.0), margin=12)
    m = measure_lesion(left | right, geometry)
    assert abs(m.long_axis_mm - (2 * radius + 16 * spacing[0])) <= pixel(spacing)
    assert abs(m.short_axis_mm - 2 * radius) <= pixel(spacing)
    assert_segment_inside(left | right, m.short_axis_ijk)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_short_axis_never_bridges_a_gap(spacing):
    """A U shape: perpendicular chords cross both arms and the gap; the short axis must stay in one piece of
    lesion, so it is clearly shorter than the U's width perpendicular to the long axis."""
    mask = np.zeros((3, 50, 80), np.uint8)
    mask[1, 5:15, 5:75] = 1
    mask[1, 35:45, 5:75] = 1
    mask[1, 5:45, 5:15] = 1
    geometry = VolumeGeometry.from_spacing(spacing, mask.shape)
    m = measure_lesion(mask, geometry)
    assert_segment_inside(mask, m.short_axis_ijk)
    plane = geometry.ijk_to_ras_points(np.argwhere(mask)[:, ::-1])
    across = unit(m.short_axis_ras)
    width = np.ptp(plane @ across)
    assert m.short_axis_mm < width - 5.0
    assert abs(unit(m.long_axis_ras) @ across) < 1e-9


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("voxels", [(5, 5, 5), (8, 8, 8), (7, 5, 6), (12, 5, 8)])
def test_volume_and_sphericity(spacing, voxels):
    radii = tuple(n * max(spacing) for n in voxels)
    mask, geometry = ellipsoid(radii, spacing)
    m = measure_lesion(mask, geometry)
    analytic_ml = 4.0 / 3.0 * math.pi * np.prod(radii) / 1000.0
    assert m.volume_ml == pytest.approx(analytic_ml, rel=0.02)
    assert m.volume_ml == pytest.approx(np.count_nonzero(mask) * np.prod(spacing) / 1000.0, rel=1e-12)
    assert abs(m.sphericity - analytic_sphericity(*radii)) <= 0.03
    assert m.surface_mm2 == pytest.approx(thomsen_area(*radii), rel=0.045)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_sphere_extent_centroid_and_3d_diameter(spacing):
    radius = 6 * spacing[2]
    mask, geometry = ellipsoid((radius, radius, radius), spacing)
    m = measure_lesion(mask, geometry)
    assert abs(m.max_diameter_3d_mm - 2 * radius) <= pixel(spacing)
    assert m.max_diameter_3d_mm >= m.long_axis_mm
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    assert m.slice_range == (int(ks[0]), int(ks[-1]))
    assert m.n_slices == 11
    centre_ijk = (np.array(mask.shape[::-1]) - 1) / 2 + OFFSET
    assert np.allclose(m.centroid_ijk, centre_ijk, atol=0.05)
    assert np.allclose(m.centroid_ras, geometry.ijk_to_ras_points(m.centroid_ijk))


def rotated_geometry(geometry: VolumeGeometry, angle_deg: float, flip_i: bool, frame: str) -> VolumeGeometry:
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    direction = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    if flip_i:
        direction[:, 0] *= -1
    return VolumeGeometry.from_spacing(geometry.spacing, geometry.shape_kji, (12.0, -40.0, 7.5), direction, frame)


def m_distance(segment: np.ndarray) -> float:
    return float(np.linalg.norm(segment[1] - segment[0]))


@pytest.mark.parametrize("angle, flip_i, frame", [(90.0, False, "RAS"), (30.0, True, "LPS"), (-117.0, True, "RAS")])
def test_direction_matrix_gives_same_millimetres(angle, flip_i, frame):
    spacing = (0.6, 0.9, 2.5)
    mask, geometry = ellipsoid((24.0, 13.0, 10.0), spacing, 35.0)
    reference = measure_lesion(mask, geometry)
    other_geometry = rotated_geometry(geometry, angle, flip_i, frame)
    other = measure_lesion(mask, other_geometry)
    for name in ("long_axis_mm", "short_axis_mm", "max_diameter_3d_mm", "volume_ml", "surface_mm2"):
        assert getattr(other, name) == pytest.approx(getattr(reference, name), rel=1e-9), name
    assert m_distance(other.long_axis_ras) == pytest.approx(reference.long_axis_mm, rel=1e-12)
    assert m_distance(other.short_axis_ras) == pytest.approx(reference.short_axis_mm, rel=1e-9)
    assert np.array_equal(other.long_axis_ijk, reference.long_axis_ijk)
    assert np.allclose(other_geometry.ras_to_ijk_points(other.long_axis_ras), other.long_axis_ijk, atol=1e-9)
    assert np.allclose(other_geometry.ras_to_ijk_points(other.short_axis_ras), other.short_axis_ijk, atol=1e-9)


def test_anisotropic_pixels_use_physical_lengths():
    """The same object drawn on a 0.6 x 0.9 grid and on the transposed 0.9 x 0.6 grid measures the same."""
    mask, geometry = ellipsoid((24.0, 13.0, 10.0), (0.6, 0.9, 2.5), 35.0)
    transposed = np.ascontiguousarray(mask.transpose(0, 2, 1))
    swapped = VolumeGeometry.from_spacing((0.9, 0.6, 2.5), transposed.shape)
    a, b = measure_lesion(mask, geometry), measure_lesion(transposed, swapped)
    assert b.long_axis_mm == pytest.approx(a.long_axis_mm, rel=1e-12)
    assert b.short_axis_mm == pytest.approx(a.short_axis_mm, abs=0.05)
    assert b.surface_mm2 == pytest.approx(a.surface_mm2, rel=1e-6)


def test_empty_mask_and_missing_label():
    geometry = VolumeGeometry.from_spacing((0.7, 0.7, 2.5), (4, 5, 6))
    empty = measure_lesion(np.zeros((4, 5, 6), np.uint8), geometry, ct_hu=np.zeros((4, 5, 6)))
    assert empty.empty and empty.long_axis_mm == 0.0 and empty.volume_ml == 0.0 and empty.n_slices == 0
    assert empty.sphericity is None and empty.hu_mean is None and empty.long_axis_ijk is None
    json.dumps(empty.to_dict())
    labelled = np.zeros((4, 5, 6), np.uint8)
    labelled[1, 2, 3] = 1
    assert measure_lesion(labelled, geometry, label=2).empty


def test_single_voxel():
    geometry = VolumeGeometry.from_spacing((0.7, 0.7, 2.5), (3, 3, 3))
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    m = measure_lesion(mask, geometry)
    assert not m.empty and m.long_axis_mm == 0.0 and m.short_axis_mm == 0.0 and m.max_diameter_3d_mm == 0.0
    assert m.volume_ml == pytest.approx(0.7 * 0.7 * 2.5 / 1000.0)
    assert m.long_axis_ijk.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert 0.0 < m.sphericity <= 1.0


# ---- degenerate and tiny masks: RECIST and isoperimetric invariants --------------------------------------

def box_sphericity(dims_mm) -> float:
    a, b, c = dims_mm
    return math.pi ** (1.0 / 3.0) * (6.0 * a * b * c) ** (2.0 / 3.0) / (2.0 * (a * b + b * c + a * c))


def assert_invariants(m: LesionMeasurement, mask: np.ndarray) -> None:
    """SA <= LA <= 3D max, SA drawn inside and as long as reported, 0 < sphericity <= 1, area >= the sphere's."""
    assert m.short_axis_mm <= m.long_axis_mm <= m.max_diameter_3d_mm + 1e-9
    assert m_distance(m.short_axis_ras) == pytest.approx(m.short_axis_mm, abs=1e-9)
    assert 0.0 < m.sphericity <= 1.0
    volume_mm3 = m.volume_ml * 1000.0
    assert m.surface_mm2 >= (36.0 * math.pi * volume_mm3 ** 2) ** (1.0 / 3.0) * (1.0 - 1e-12)
    if m.long_axis_mm > 0.0:
        assert abs(unit(m.long_axis_ras) @ unit(m.short_axis_ras)) < 1e-9
        # The ends are refined linearly between samples a quarter pixel apart, but the bilinear field is
        # quadratic along an oblique line: on these jagged blobs an end sat up to 0.008 below the 0.5 level.
        assert_segment_inside(mask, m.short_axis_ijk, tolerance=0.01)


def test_single_slice_square():
    """The reported case: a one-slice 10 x 10 pixel square at 1 mm measured SA 13.56 > LA 12.73 and sphericity
    1.78. Both diagonals are 9 sqrt 2 between voxel centres; the slab's sphericity is low, a little above the
    box's own 0.434 (the smoothed surface rounds its rims)."""
    mask = np.zeros((3, 14, 14), np.uint8)
    mask[1, 2:12, 2:12] = 1
    m = measure_lesion(mask, VolumeGeometry.from_spacing((1.0, 1.0, 1.0), mask.shape))
    assert_invariants(m, mask)
    assert m.long_axis_mm == pytest.approx(9 * math.sqrt(2), rel=1e-12)
    assert m.short_axis_mm == pytest.approx(m.long_axis_mm, rel=1e-12)
    assert box_sphericity((10, 10, 1)) < m.sphericity < 0.5


@pytest.mark.parametrize("spacing", SPACINGS + [(1.0, 1.0, 1.0)])
def test_one_voxel_and_two_voxel_cube(spacing):
    """Below the blur's resolution a voxel or a 2 x 2 x 2 cube reads as a rounded box: at least as compact as
    the box, at most a sphere."""
    for n in (1, 2):
        mask = np.zeros((n + 2, n + 2, n + 2), np.uint8)
        mask[1:-1, 1:-1, 1:-1] = 1
        m = measure_lesion(mask, VolumeGeometry.from_spacing(spacing, mask.shape))
        assert_invariants(m, mask)
        assert m.long_axis_mm == pytest.approx((n - 1) * math.hypot(spacing[0], spacing[1]), abs=1e-12)
        assert box_sphericity(np.multiply(spacing, n)) <= m.sphericity <= 1.0


@pytest.mark.parametrize("spacing", SPACINGS + [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5)])
@pytest.mark.parametrize("n_slices", [1, 2, 3])
@pytest.mark.parametrize("side", [10, 40])
def test_thin_slabs(spacing, n_slices, side):
    """Square slabs 1-3 slices thick: between the box's own sphericity and 1; a 40-pixel slab one slice thick
    is dominated by its two faces, so its smoothed sphericity stays within 12 % of the box's (measured 4-9 %)."""
    mask = np.zeros((n_slices + 2, side + 2, side + 2), np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    m = measure_lesion(mask, VolumeGeometry.from_spacing(spacing, mask.shape))
    assert_invariants(m, mask)
    assert m.long_axis_mm == pytest.approx((side - 1) * math.hypot(spacing[0], spacing[1]), rel=1e-12)
    box = box_sphericity((side * spacing[0], side * spacing[1], n_slices * spacing[2]))
    assert box <= m.sphericity <= 1.0
    if n_slices == 1 and side == 40:
        assert m.sphericity <= 1.12 * box


def random_blob(rng: np.random.Generator) -> np.ndarray:
    """(K, J, I) mask of a random blob up to 5 x 9 x 9 voxels (noise, optionally smoothed), zero-padded by 1."""
    shape = rng.integers(1, [5, 9, 9], endpoint=True)
    blob = rng.random(shape) < rng.uniform(0.3, 0.9)
    if rng.random() < 0.5:
        from scipy import ndimage

        blob = ndimage.gaussian_filter(blob.astype(float), 0.7) > 0.4
    return np.pad(blob, 1).astype(np.uint8)


@pytest.mark.parametrize("spacing", SPACINGS + [(1.0, 1.0, 1.0)])
def test_random_small_blobs_keep_invariants(spacing):
    """Property test: 40 seeded random blobs per spacing (their largest component, 1 to ~400 voxels)."""
    rng = np.random.default_rng(4242)
    measured = 0
    for _ in range(40):
        mask = random_blob(rng)
        if not mask.any():
            continue
        m = measure_lesion(mask, VolumeGeometry.from_spacing(spacing, mask.shape))
        assert_invariants(m, mask)
        measured += 1
    assert measured >= 35


def test_shape_mismatch_raises():
    geometry = VolumeGeometry.from_spacing((1.0, 1.0, 1.0), (4, 5, 6))
    mask = np.ones((4, 5, 6), np.uint8)
    with pytest.raises(ValueError, match="CT"):
        measure_lesion(mask, geometry, ct_hu=np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match="geometry"):
        measure_lesion(np.ones((4, 5, 7), np.uint8), geometry)
    with pytest.raises(ValueError, match="3D"):
        measure_lesion(np.ones((5, 6), np.uint8), geometry)


def two_spheres():
    spacing = (1.0, 1.0, 1.0)
    big, geometry = ellipsoid((8.0, 8.0, 8.0), spacing, offset=(-12.0, 0.0, 0.0), margin=20)
    small, _ = ellipsoid((4.0, 4.0, 4.0), spacing, offset=(12.0, 0.0, 0.0), margin=24)
    return big, small, geometry


def test_largest_component_default_and_all_components():
    big, small, geometry = two_spheres()
    mask = big | small
    largest = measure_lesion(mask, geometry)
    assert largest.n_components == 2
    assert largest.n_voxels == np.count_nonzero(big)
    assert largest.long_axis_mm == measure_lesion(big, geometry).long_axis_mm
    both = measure_lesion(mask, geometry, largest_component=False)
    assert both.n_voxels == np.count_nonzero(mask) and both.n_components == 2
    assert both.long_axis_mm > 2 * 12.0 + 8.0 + 4.0 - 2.0


def test_label_selection_and_hu_statistics():
    big, small, geometry = two_spheres()
    labels = big.astype(np.uint8) + 2 * small.astype(np.uint8)
    ct = np.random.default_rng(3).normal(40.0, 12.0, labels.shape).astype(np.int16)
    m = measure_lesion(labels, geometry, ct_hu=ct, label=2)
    assert m.label == 2 and m.n_voxels == np.count_nonzero(small) and m.n_components == 1
    values = ct[labels == 2].astype(float)
    assert m.hu_mean == pytest.approx(values.mean(), rel=1e-12)
    assert m.hu_sd == pytest.approx(values.std(), rel=1e-12)
    assert measure_lesion(labels, geometry, ct_hu=ct).n_voxels == np.count_nonzero(big)


def test_to_dict_is_flat_json_with_units_and_lps():
    mask, geometry = ellipsoid((12.0, 8.0, 10.0), (0.7, 0.7, 2.5), 20.0)
    m = measure_lesion(mask, geometry)
    ras, lps = m.to_dict(), m.to_dict(frame="LPS")
    assert json.loads(json.dumps(ras)) == ras
    assert all(not isinstance(value, (list, dict, tuple, np.ndarray)) for value in ras.values())
    for key in ("long_axis_mm", "short_axis_mm", "volume_ml", "surface_mm2", "sphericity", "max_diameter_3d_mm",
                "long_axis_slice_k", "n_slices", "hu_mean", "centroid_r_mm", "long_axis_p1_s_mm"):
        assert key in ras, key
    assert lps["long_axis_p0_l_mm"] == -ras["long_axis_p0_r_mm"]
    assert np.allclose(m.long_axis_lps(), m.long_axis_ras * [-1, -1, 1])
    assert isinstance(m, LesionMeasurement)


# ---- real lesions ------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _real(data_dir, lesion_id: str) -> LesionMeasurement:
    ct = io.read_volume(data_dir / "lesions" / f"{lesion_id}_ct.nii.gz")
    mask = io.read_mask(data_dir / "lesions" / f"{lesion_id}_mask.nii.gz", like=ct)
    return measure_lesion(mask, ct.geometry, ct.array)


def test_real_lesions_agree_with_manifest(data_dir, manifest):
    assert len(manifest) == 32
    for lesion_id, row in manifest.items():
        m = _real(data_dir, lesion_id)
        assert abs(m.long_axis_mm - float(row["axial_LA_mm"])) <= 1.0, lesion_id
        assert m.short_axis_mm <= float(row["axial_SA_mm"]) + 1.0, lesion_id
        assert m.volume_ml == pytest.approx(float(row["vol_ml"]), abs=0.01), lesion_id
        assert m.n_voxels == int(row["voxels"]), lesion_id
        assert m.n_slices == int(row["n_slices"]), lesion_id
        assert m.long_axis_slice == int(row["LA_slice"]), lesion_id
        assert int(m.hu_mean) == int(row["HU_mean"]), lesion_id  # the manifest truncates toward zero
        assert 0.5 < m.sphericity < 1.0, lesion_id


def test_cli_measure_real_lesion(data_dir, manifest, tmp_path, capsys):
    lesion = data_dir / "lesions" / "lidc_0001_n1"
    json_path, csv_path = tmp_path / "m.json", tmp_path / "m.csv"
    code = main(["measure", f"{lesion}_ct.nii.gz", f"{lesion}_mask.nii.gz", "--json", str(json_path),
                 "--csv", str(csv_path)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = json.loads(json_path.read_text())
    assert "LA mm" in printed and f"{rows[0]['long_axis_mm']:.1f}" in printed
    assert len(rows) == 1 and rows[0]["label"] == 1
    assert abs(rows[0]["long_axis_mm"] - float(manifest["lidc_0001_n1"]["axial_LA_mm"])) <= 0.1
    with open(csv_path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert float(table[0]["volume_ml"]) == pytest.approx(rows[0]["volume_ml"])
    assert main(["measure", f"{lesion}_ct.nii.gz", f"{lesion}_mask.nii.gz", "--label", "7"]) == 0
    assert "empty" in capsys.readouterr().out


def test_cli_refuses_mismatched_geometry(data_dir, capsys):
    lesions = data_dir / "lesions"
    code = main(["measure", str(lesions / "sts_001_ct.nii.gz"), str(lesions / "sts_002_mask.nii.gz")])
    assert code == 2
    assert "shape" in capsys.readouterr().err


# ---- pyradiomics cross-check (skipped when pyradiomics is not installed) -----------------------------------

def test_pyradiomics_cross_check():
    """pyradiomics measures its unsmoothed marching-cubes mesh, whose vertices sit half-way between inside and
    outside voxel centres: its 2D diameter exceeds our voxel-centre long axis by up to about one pixel, its
    MeshVolume is within 1 % of the voxel count, and its sphericity is low on spheres (staircase area)."""
    shape = pytest.importorskip("radiomics.shape")
    import SimpleITK as sitk

    spacing = (0.7, 0.7, 2.5)
    mask, geometry = ellipsoid((12.5, 12.5, 12.5), spacing)
    image = sitk.GetImageFromArray(mask.astype(np.float32))
    label = sitk.GetImageFromArray(mask)
    for item in (image, label):
        item.SetSpacing(spacing)
    features = shape.RadiomicsShape(image, label)
    features.enableAllFeatures()
    theirs = {name: float(value) for name, value in features.execute().items()}
    ours = measure_lesion(mask, geometry)
    assert 0.0 <= theirs["Maximum2DDiameterSlice"] - ours.long_axis_mm <= 1.5 * pixel(spacing)
    assert theirs["MeshVolume"] / 1000.0 == pytest.approx(ours.volume_ml, rel=0.01)
    assert theirs["Sphericity"] < 0.90 < 0.97 < ours.sphericity
