"""Geometry of preprocess_study: markers at known LPS points land on the same grid voxel in every channel.

Series are built in memory with pydicom (preprocessing.testing): pixel values are a function of the
LPS position of each pixel centre, so the true position of a marker is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from contract import DEFAULT_GRID, SEQUENCES
from preprocessing import grid as grid_mod
from preprocessing.pipeline import preprocess_study
from preprocessing.testing import SAGITTAL, blob, make_series, oblique_orientation

T2W_CENTER = np.array([4.0, -30.0, 12.0])


def marker_index(channel: np.ndarray) -> np.ndarray:
    """Continuous ``(k, j, i)`` centroid of the voxels at >= half of the channel's peak above its minimum."""
    lo, hi = float(channel.min()), float(channel.max())
    w = np.clip(channel - lo, 0, None) * (channel >= lo + 0.5 * (hi - lo))
    idx = np.indices(channel.shape).reshape(3, -1)
    return (idx * w.reshape(-1)).sum(axis=1) / w.sum()


def grid_index_to_lps_for_axial_t2w(index_kji: tuple[int, int, int]) -> np.ndarray:
    """Expected LPS of a grid voxel for an axial T2W centred on T2W_CENTER (grid centred, identity direction)."""
    size = np.asarray(DEFAULT_GRID.size_dhw, dtype=float)
    spacing = np.asarray(DEFAULT_GRID.spacing_mm_dhw, dtype=float)
    offset_dhw = (np.asarray(index_kji, dtype=float) - (size - 1) / 2) * spacing
    return T2W_CENTER + offset_dhw[::-1]  # (k, j, i) -> (x, y, z)


def study(marker_lps: np.ndarray, t2w_orientation=None, enhanced: bool = False, t2w_order: str = "shuffled"):
    """T2W (fine in-plane), oblique ADC and oblique multi-b DWI with other spacings, all with the marker."""
    uid = generate_uid()
    fn = blob(marker_lps, sigma_mm=4.0, peak=1000.0, background=100.0)
    t2w = make_series(
        description="t2_tse_tra",
        value_fn=fn,
        center_lps_mm=T2W_CENTER,
        orientation=t2w_orientation or (1.0, 0, 0, 0, 1.0, 0),
        rows=120,
        columns=110,
        num_slices=22,
        pixel_spacing_mm=(0.75, 0.8),
        slice_spacing_mm=3.3,
        study_uid=uid,
        series_number=3,
        instance_order=t2w_order,
    )
    adc = make_series(
        description="ep2d_diff_b50_400_800_1400_ADC",
        value_fn=blob(marker_lps, sigma_mm=4.0, peak=1500.0, background=800.0),
        center_lps_mm=T2W_CENTER + np.array([3.0, -2.0, 1.0]),
        orientation=oblique_orientation(20.0, (1.0, 0.0, 0.0)),
        rows=48,
        columns=52,
        num_slices=16,
        pixel_spacing_mm=(2.1, 1.9),
        slice_spacing_mm=3.6,
        study_uid=uid,
        series_number=6,
        image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
        rescale=(0.5, 10.0),
        enhanced=enhanced,
        seed=1,
    )
    dwi = make_series(
        description="ep2d_diff_b50_400_800_1400",
        value_fn=fn,
        center_lps_mm=T2W_CENTER + np.array([-2.0, 1.0, -3.0]),
        orientation=oblique_orientation(-12.0, (0.3, 1.0, 0.2)),
        rows=50,
        columns=44,
        num_slices=15,
        pixel_spacing_mm=(1.8, 2.2),
        slice_spacing_mm=4.2,
        study_uid=uid,
        series_number=5,
        b_values=[50, 800, 1400],
        enhanced=enhanced,
        seed=2,
    )
    return t2w + adc + dwi


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced-multiframe"])
def test_marker_lands_on_same_voxel_in_every_channel_and_maps_back(enhanced: bool) -> None:
    target = (9, 28, 36)
    marker = grid_index_to_lps_for_axial_t2w(target)
    out = preprocess_study(study(marker, enhanced=enhanced))
    assert out.availability.tolist() == [1.0, 1.0, 1.0]
    # the grid is centred on the T2W volume with T2W's (axial) direction
    np.testing.assert_allclose(out.geometry.lps_to_index(marker), target, atol=1e-6)
    for ch, seq in enumerate(SEQUENCES):
        centroid = marker_index(out.tensor[ch])
        assert np.all(np.abs(centroid - target) < 0.5), (seq, centroid)
        assert tuple(np.round(centroid).astype(int)) == target, seq
        back = out.geometry.index_to_lps(centroid)
        assert np.all(np.abs(back - marker) < np.asarray(DEFAULT_GRID.spacing_mm_dhw[::-1])), (seq, back)


def test_oblique_t2w_grid_follows_t2w_direction_and_marker_round_trips() -> None:
    orientation = oblique_orientation(25.0, (1.0, 0.4, 0.0))
    # marker 10 mm off-centre along each in-plane axis and 6 mm along the normal of the oblique T2W
    r, c = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(r, c)
    marker = T2W_CENTER + 10 * r - 8 * c + 6 * n
    out = preprocess_study(study(marker, t2w_orientation=orientation))
    direction = out.geometry.direction_matrix
    np.testing.assert_allclose(direction[:, 0], r / np.linalg.norm(r), atol=1e-6)
    np.testing.assert_allclose(direction[:, 2], n / np.linalg.norm(n), atol=1e-6)
    # the grid centre is the centre of the (oblique) T2W volume
    centre_index = (np.asarray(DEFAULT_GRID.size_dhw, dtype=float) - 1) / 2
    np.testing.assert_allclose(out.geometry.index_to_lps(centre_index), T2W_CENTER, atol=1e-3)
    expected = out.geometry.lps_to_index(marker)
    for ch, seq in enumerate(SEQUENCES):
        centroid = marker_index(out.tensor[ch])
        assert np.all(np.abs(centroid - expected) < 1.0), (seq, centroid, expected)
        back = out.geometry.index_to_lps(centroid)
        assert np.linalg.norm(back - marker) < max(DEFAULT_GRID.spacing_mm_dhw), (seq, back)


def test_slice_order_does_not_depend_on_instance_number_or_input_order() -> None:
    marker = grid_index_to_lps_for_axial_t2w((5, 40, 20))
    outs = [preprocess_study(study(marker, t2w_order=order)) for order in ("sorted", "reversed", "shuffled")]
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0].tensor, other.tensor)
    # and feeding the instances in yet another order gives the same tensor
    datasets = study(marker)
    shuffled = list(reversed(datasets))
    np.testing.assert_array_equal(preprocess_study(datasets).tensor, preprocess_study(shuffled).tensor)


def test_rescale_slope_and_intercept_are_applied() -> None:
    """ADC stored with slope 0.5 / intercept 10 must come out in physical units (fixed scaling, no percentiles)."""
    uid = generate_uid()

    def constant(value: float):
        return lambda p: np.full(p.shape[:-1], value)

    t2w = make_series(description="t2_tse_tra", value_fn=blob((0, 0, 0)), study_uid=uid)
    adc_plain = make_series(
        description="ADC", value_fn=constant(1500.0), study_uid=uid, image_type=("DERIVED", "PRIMARY", "ADC")
    )
    adc_scaled = make_series(
        description="ADC",
        value_fn=constant(1500.0),
        study_uid=uid,
        image_type=("DERIVED", "PRIMARY", "ADC"),
        rescale=(0.5, 10.0),
    )
    assert int(adc_scaled[0].pixel_array[0, 0]) == 2980  # stored (1500 - 10) / 0.5
    a = preprocess_study(t2w + adc_plain)
    b = preprocess_study(t2w + adc_scaled)
    ch = SEQUENCES.index("adc")
    inside = b.tensor[ch] > 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(b.tensor[ch][inside], 1500.0 / 3000.0, atol=1e-5)
    np.testing.assert_allclose(a.tensor[ch], b.tensor[ch], atol=1e-5)
    assert b.meta["normalization"]["adc"]["median_inside_fov"] == pytest.approx(1500.0)


def test_label_resampling_is_nearest_neighbour_on_the_grid() -> None:
    marker = grid_index_to_lps_for_axial_t2w((8, 32, 32))
    out = preprocess_study(study(marker))
    # a label image in a different (fine) geometry with a sphere of radius 6 mm around the marker
    label = sitk.Image([80, 80, 40], sitk.sitkUInt8)
    label.SetSpacing((0.5, 0.5, 1.0))
    label.SetOrigin(tuple(float(v) for v in marker - np.array([20.0, 20.0, 20.0])))
    arr = np.zeros((40, 80, 80), dtype=np.uint8)
    zz, yy, xx = np.indices(arr.shape)
    pts = np.stack([xx * 0.5, yy * 0.5, zz * 1.0], axis=-1) + (marker - 20.0)
    arr[np.linalg.norm(pts - marker, axis=-1) <= 6.0] = 3
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(label)
    res = grid_mod.resample_label_to_grid(img, out.geometry)
    assert res.dtype == np.uint8 and res.shape == DEFAULT_GRID.size_dhw
    assert set(np.unique(res).tolist()) == {0, 3}  # nearest neighbour: no blended label values
    centroid = np.argwhere(res == 3).mean(axis=0)
    np.testing.assert_allclose(centroid, (8, 32, 32), atol=0.5)
    assert out.grid_image().GetSize() == out.geometry.size_ijk


def test_inside_fov_mask_matches_where_simpleitk_interpolates() -> None:
    ref = sitk.Image([40, 40, 10], sitk.sitkFloat32)
    ref.SetSpacing((1.0, 1.0, 3.0))
    geometry = grid_mod.grid_geometry_for(ref)
    src = sitk.Image([30, 25, 8], sitk.sitkFloat32) + 1.0
    o = oblique_orientation(25.0, (1.0, 1.0, 0.0))
    r, c = np.asarray(o[:3]), np.asarray(o[3:])
    src.SetDirection(tuple(np.stack([r, c, np.cross(r, c)], axis=1).reshape(-1)))
    src.SetSpacing((2.0, 1.5, 4.0))
    src.SetOrigin((-5.0, 10.0, -12.0))
    values = grid_mod.resample_to_grid(src, geometry)
    mask = grid_mod.inside_fov_mask(src, geometry)
    assert 0.05 < mask.mean() < 0.95
    np.testing.assert_array_equal(mask, values > 0)


def test_sagittal_only_t2w_defines_a_sagittal_grid_with_a_warning() -> None:
    uid = generate_uid()
    t2w = make_series(description="t2_tse_sag", value_fn=blob((0, 0, 0)), orientation=SAGITTAL, study_uid=uid)
    out = preprocess_study(t2w)
    assert abs(out.geometry.direction_matrix[0, 2]) == pytest.approx(1.0)  # slice axis along patient x
    assert any("no axial series" in w for w in out.meta["warnings"])
