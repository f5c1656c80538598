"""The speed-ups of the resample/normalize stages: each optimized step against the code it replaced (kept
here verbatim as the reference), and the realistic grid end to end.

Training and serving share one code path. The normalization and the FOV mask equal their references bit for
bit (raw float32 bits, not a tolerance). The compiled resampler equals SimpleITK's linear resampling to float32
rounding (a few ulp; it divides by the spacing where ITK multiplies by its inverse), checked on random oblique
geometries and end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from contract import (
    DEFAULT_GRID,
    NORMALIZATION,
    OUTSIDE_FOV_VALUE,
    REALISTIC_GRID,
    SEQUENCES,
    FixedScaleNormalization,
    GridGeometry,
    NormalizationSpec,
    PercentileNormalization,
)
from preprocessing import grid as grid_mod
from preprocessing import linear_resample as lin
from preprocessing import pipeline as pipeline_mod
from preprocessing.linear_resample import is_diagonal, resample_with_mask, source_index_affine
from preprocessing.normalize import median, normalize_channel, order_statistics, percentiles_linear
from preprocessing.pipeline import PreprocessSettings, preprocess_study


# --------------------------------------------------------------------------------------------------
# The reference implementations (the code before the speed-ups, unchanged)
# --------------------------------------------------------------------------------------------------
def reference_inside_fov_mask(image: sitk.Image, geometry: GridGeometry) -> np.ndarray:
    grid_dir = geometry.direction_matrix
    src_dir = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    src_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    offset = ((np.asarray(geometry.origin_lps_mm) - np.asarray(image.GetOrigin())) @ src_dir) / src_spacing
    steps = ((grid_dir * np.asarray(geometry.spacing_mm_ijk)).T @ src_dir) / src_spacing
    size_i, size_j, size_k = geometry.size_ijk
    ci = np.arange(size_i)[None, None, :, None] * steps[0]
    cj = np.arange(size_j)[None, :, None, None] * steps[1]
    ck = np.arange(size_k)[:, None, None, None] * steps[2]
    plane = offset + ck + cj
    size = np.asarray(image.GetSize(), dtype=np.float64)
    eps = 1e-6
    lower = -0.5 - eps
    upper = size - 0.5 + eps
    inside = np.ones((size_k, size_j, size_i), dtype=bool)
    for axis in range(3):
        src = plane[..., axis] + ci[..., axis]
        inside &= src >= lower
        inside &= src <= upper[axis]
    return inside


def reference_normalize_channel(
    values_dhw: np.ndarray, inside_fov: np.ndarray, spec: NormalizationSpec
) -> tuple[np.ndarray, dict[str, Any]]:
    inside = values_dhw[inside_fov]
    params: dict[str, Any] = {"kind": spec.kind, "inside_fov_fraction": round(float(inside_fov.mean()), 6)}
    if isinstance(spec, PercentileNormalization):
        if inside.size == 0:
            lo = hi = 0.0
        else:
            lo, hi = (float(v) for v in np.percentile(inside, [spec.lower_percentile, spec.upper_percentile]))
        scale = hi - lo
        degenerate = not scale > 1e-6 * max(abs(hi), abs(lo), 1.0)
        if degenerate:
            scale = 1.0
        out = (values_dhw - np.float32(lo)) * np.float32(1.0 / scale)
        params.update(
            {
                "lower_percentile": spec.lower_percentile,
                "upper_percentile": spec.upper_percentile,
                "lower_value": lo,
                "upper_value": hi,
                "degenerate": degenerate,
            }
        )
    else:
        assert isinstance(spec, FixedScaleNormalization)
        out = values_dhw * np.float32(1.0 / spec.divisor)
        params.update(
            {
                "divisor": spec.divisor,
                "unit": spec.unit,
                "median_inside_fov": float(np.median(inside)) if inside.size else None,
            }
        )
    np.clip(out, spec.clip_min, spec.clip_max, out=out)
    out[~inside_fov] = OUTSIDE_FOV_VALUE
    params.update({"clip_min": spec.clip_min, "clip_max": spec.clip_max, "outside_fov_value": OUTSIDE_FOV_VALUE})
    return out.astype(np.float32, copy=False), params


def reference_resample_to_grid(image: sitk.Image, geometry: GridGeometry) -> np.ndarray:
    """SimpleITK's linear resampling of ``image`` padded by one replicated voxel on every side, then 0 outside
    the FOV mask: linear interpolation inside the voxel box, edge values on its faces (where the unpadded
    resampler's half-open box would give the default on one side and not the other)."""
    padded = sitk.ZeroFluxNeumannPad(image, [1, 1, 1], [1, 1, 1])
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(grid_mod.grid_image(geometry))
    f.SetTransform(sitk.Transform())
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(sitk.sitkFloat32)
    f.SetNumberOfThreads(1)
    values = sitk.GetArrayFromImage(f.Execute(padded))
    values[~reference_inside_fov_mask(image, geometry)] = 0.0
    return values


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --------------------------------------------------------------------------------------------------
# FOV mask
# --------------------------------------------------------------------------------------------------
def test_fov_mask_equals_voxelwise_definition_on_random_geometries() -> None:
    rng = np.random.default_rng(20261126)
    partial = 0
    for trial in range(300):
        size = [int(v) for v in rng.integers(2, 50, 3)]
        image = sitk.Image(size, sitk.sitkFloat32)
        spacing = rng.uniform(0.3, 4.0, 3)
        kind = trial % 4
        if kind == 0:
            direction = np.eye(3)
        elif kind == 1:
            direction = random_rotation(rng)
        elif kind == 2:
            direction = np.diag(rng.choice([-1.0, 1.0], 3))  # flipped axes: negative steps
        else:
            a = np.deg2rad(rng.uniform(-20, 20))
            direction = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        image.SetSpacing(spacing.tolist())
        image.SetDirection(direction.ravel().tolist())
        image.SetOrigin(rng.uniform(-50, 50, 3).tolist())
        grid_dir = direction if trial % 3 == 0 else (np.eye(3) if trial % 5 == 0 else random_rotation(rng))
        grid_spacing = rng.choice([0.5, 1.0, 1.5, 3.0], 3) if trial % 2 else rng.uniform(0.2, 5.0, 3)
        # grid origins on the source lattice (and on its half-voxel boundary): comparisons hit the bounds exactly
        origin = np.asarray(image.GetOrigin()) + direction @ (spacing * rng.integers(-5, 5, 3))
        if trial % 7 == 0:
            origin = origin - direction @ (spacing * 0.5)
        geometry = GridGeometry(
            origin_lps_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in grid_dir.ravel()),
            spacing_mm_ijk=tuple(float(v) for v in grid_spacing),  # type: ignore[arg-type]
            size_ijk=tuple(int(v) for v in rng.integers(2, 40, 3)),  # type: ignore[arg-type]
        )
        expected = reference_inside_fov_mask(image, geometry)
        np.testing.assert_array_equal(grid_mod.inside_fov_mask(image, geometry), expected, err_msg=f"trial {trial}")
        partial += bool(expected.any() and not expected.all())
    assert partial > 100  # the boundaries were exercised, not only all-in / all-out cases


def _random_case(rng: np.random.Generator, trial: int) -> tuple[sitk.Image, GridGeometry]:
    size = [int(v) for v in rng.integers(3, 40, 3)]
    image = sitk.GetImageFromArray(rng.gamma(2.0, 200.0, size[::-1]).astype(np.float32))
    spacing = rng.uniform(0.3, 3.0, 3)
    direction = np.eye(3) if trial % 3 == 0 else random_rotation(rng)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(rng.uniform(-20, 20, 3).tolist())
    grid_dir = direction if trial % 2 == 0 else random_rotation(rng)  # even trials: the source's own axes
    grid_spacing = rng.choice([0.5, 1.0, 1.5, 3.0], 3) if trial % 4 < 2 else rng.uniform(0.2, 5.0, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ (spacing * rng.integers(-5, 5, 3))
    if trial % 7 == 0:
        origin = origin - direction @ (spacing * 0.5)  # grid points on the voxel-box faces
    geometry = GridGeometry(
        origin_lps_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in grid_dir.ravel()),
        spacing_mm_ijk=tuple(float(v) for v in grid_spacing),  # type: ignore[arg-type]
        size_ijk=tuple(int(v) for v in rng.integers(2, 40, 3)),  # type: ignore[arg-type]
    )
    return image, geometry


def test_linear_resampler_matches_simpleitk_to_a_few_ulp() -> None:
    """The compiled resampler interpolates as SimpleITK's ``sitkLinear`` does, with edge values on the voxel-box
    faces (grid points exactly on a face are common: a 24-slice grid centred on a 23-slice T2W): every value
    agrees to a few float32 units in the last place (a relative 1e-6 at most), and most bit for bit."""
    rng = np.random.default_rng(5)
    compared = differing = 0
    for trial in range(120):
        image, geometry = _random_case(rng, trial)
        expected = reference_resample_to_grid(image, geometry)
        got, inside, count = resample_with_mask(image, geometry)
        np.testing.assert_array_equal(inside, reference_inside_fov_mask(image, geometry), err_msg=f"trial {trial}")
        assert count == int(inside.sum())
        assert np.all(got[~inside] == 0.0)
        sel = inside
        ulp = np.abs(bits(got[sel]).astype(np.int64) - bits(expected[sel]).astype(np.int64))
        assert ulp.size == 0 or int(ulp.max()) <= 8, f"trial {trial}: {int(ulp.max())} ulp"
        compared += int(sel.sum())
        differing += int(np.count_nonzero(ulp))
    assert compared > 100_000
    assert differing / compared < 0.1  # ~6 % differ, by 1-8 ulp: ITK multiplies by 1/spacing, we divide


def test_separable_fast_path_equals_general_kernel() -> None:
    """On a grid that shares the source's axes the axis-by-axis kernel gives the general kernel's values bit
    for bit (same indices, same lerps on the same operands), also over partial slabs and with a nonzero
    default."""
    rng = np.random.default_rng(11)
    checked = 0
    for trial in range(0, 80, 2):
        image, geometry = _random_case(rng, trial)
        offset, steps = source_index_affine(image.GetOrigin(), image.GetDirection(), image.GetSpacing(), geometry)
        if not is_diagonal(steps):
            continue
        checked += 1
        shape = tuple(int(v) for v in geometry.size_ijk[::-1])
        src = sitk.GetArrayViewFromImage(image)
        results = []
        for kernel in (lin._resample_separable, lin._resample_general):
            out = np.full(shape, 9.0, dtype=np.float32)
            inside = np.zeros(shape, dtype=bool)
            n = kernel(src, offset, steps, -3.0, out, inside, 0, shape[0])
            results.append((bits(out), inside, n))
        np.testing.assert_array_equal(results[0][0], results[1][0], err_msg=f"trial {trial}")
        np.testing.assert_array_equal(results[0][1], results[1][1])
        assert results[0][2] == results[1][2]
        whole = resample_with_mask(image, geometry, default_value=-3.0)[0]
        slabbed = np.empty(shape, dtype=np.float32)
        inside = np.empty(shape, dtype=bool)
        for a, b in ((0, shape[0] // 2), (shape[0] // 2, shape[0])):
            resample_with_mask(image, geometry, -3.0, out=slabbed, inside=inside, k_range=(a, b))
        np.testing.assert_array_equal(bits(slabbed), bits(whole))
    assert checked >= 15


def test_oblique_grid_on_its_own_source_axes_takes_the_diagonal_path() -> None:
    """T2W and its model grid share an oblique direction; rounding leaves ~1e-17 off the diagonal of the
    index map, which is snapped to zero (it moves no index by 1e-9 voxels over the grid)."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        direction = random_rotation(rng)
        origin = rng.uniform(-30, 30, 3)
        spacing = rng.uniform(0.3, 3.6, 3)
        geometry = grid_mod.grid_geometry_of(origin, direction.ravel(), spacing, (320, 320, 21), REALISTIC_GRID)
        _, steps = source_index_affine(origin, direction.ravel(), spacing, geometry)
        assert is_diagonal(steps)
        raw = ((geometry.direction_matrix * np.asarray(geometry.spacing_mm_ijk)).T @ direction) / spacing
        np.testing.assert_allclose(np.diag(steps), np.diag(raw), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Percentiles, median, normalization
# --------------------------------------------------------------------------------------------------
def _sample(rng: np.random.Generator, n: int, kind: int) -> np.ndarray:
    if kind == 0:
        x = rng.normal(100.0, 30.0, n)
    elif kind == 1:
        x = rng.integers(0, 50, n)  # many ties
    elif kind == 2:
        x = np.full(n, 3.0)  # constant
    elif kind == 3:
        x = rng.exponential(1000.0, n)  # skewed
    else:
        x = np.concatenate([np.zeros(n // 2), rng.uniform(0.0, 1.0, n - n // 2)])  # half background
        rng.shuffle(x)
    return x.astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 5, 100, 19_999, 20_000, 20_001, 65_536, 200_003, 1_572_864])
def test_percentiles_and_median_equal_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    for kind in range(5):
        x = _sample(rng, n, kind)
        for q in ((1.0, 99.0), (0.5, 99.5), (2.0, 98.0), (25.0, 75.0), (0.0, 100.0), (50.0, 50.0)):
            expected = [float(v) for v in np.percentile(x, q)]
            assert percentiles_linear(x.copy(), q) == expected, (n, kind, q)
        assert median(x.copy()) == float(np.median(x)), (n, kind)


def test_percentiles_with_nan_and_inf_equal_numpy() -> None:
    rng = np.random.default_rng(3)
    x = _sample(rng, 50_000, 0)
    x[17] = np.inf
    x[99] = -np.inf
    assert percentiles_linear(x.copy(), (1.0, 99.0)) == [float(v) for v in np.percentile(x, [1.0, 99.0])]
    x[5] = np.nan
    got = percentiles_linear(x.copy(), (1.0, 99.0))
    assert all(np.isnan(v) for v in got)
    assert np.isnan(median(x.copy())) and np.isnan(np.median(x))


def test_order_statistics_are_exact_with_ties_negatives_and_infinities() -> None:
    # half the values tied at one key, the rest spread over both signs and many exponents: every rank is the
    # sorted array's, on the whole array and under a mask, and the input is left as it was
    rng = np.random.default_rng(5)
    x = np.concatenate(
        [np.zeros(100_000), np.arange(100_000), -rng.exponential(1e-3, 30_000), rng.lognormal(0, 8, 30_000)]
    ).astype(np.float32)
    x[[7, 70]] = (np.inf, -np.inf)
    rng.shuffle(x)
    before = x.copy()
    ranks = np.array([0, 1, 1_999, 2_000, 129_999, 130_000, 150_000, 197_999, 259_999])
    got = order_statistics(x, ranks)
    assert got is not None and [got[int(r)] for r in ranks] == list(np.sort(x)[ranks])
    inside = rng.random(x.size) > 0.4
    some = ranks[ranks < int(inside.sum())]
    got = order_statistics(x, some, inside)
    assert got is not None and [got[int(r)] for r in some] == list(np.sort(x[inside])[some])
    np.testing.assert_array_equal(x, before)
    x[12] = np.nan
    assert order_statistics(x, ranks) is None


@pytest.mark.parametrize("n", [19_999, 65_536, 1_572_864])
def test_masked_percentiles_and_median_equal_numpy_on_the_selection(n: int) -> None:
    rng = np.random.default_rng(n + 1)
    for kind in range(5):
        x = _sample(rng, n, kind).reshape(-1, 16) if n % 16 == 0 else _sample(rng, n, kind)
        inside = rng.random(x.shape) > 0.25
        sel = x[inside]
        for q in ((1.0, 99.0), (0.5, 99.5), (0.0, 100.0)):
            assert percentiles_linear(x, q, inside) == [float(v) for v in np.percentile(sel, q)], (n, kind, q)
        assert median(x, inside) == float(np.median(sel)), (n, kind)
    assert median(x.astype(np.float64), inside) == float(np.median(x.astype(np.float64)[inside]))


@pytest.mark.parametrize("seq", SEQUENCES)
def test_normalize_channel_equals_reference(seq: str) -> None:
    rng = np.random.default_rng(sum(map(ord, seq)))
    spec = NORMALIZATION[seq]
    for trial in range(12):
        shape = (int(rng.integers(2, 30)), int(rng.integers(2, 200)), int(rng.integers(2, 200)))
        values = rng.gamma(2.0, 200.0, shape).astype(np.float32)
        inside = rng.random(shape) > (trial % 4) * 0.3
        if trial == 11:
            inside[:] = False
        expected, expected_params = reference_normalize_channel(values.copy(), inside, spec)
        got, params = normalize_channel(values.copy(), inside, spec)
        assert params == expected_params
        np.testing.assert_array_equal(bits(got), bits(expected))
        into = np.full(shape, 7.0, dtype=np.float32)
        got_into, _ = normalize_channel(values.copy(), inside, spec, out=into)
        assert got_into is into
        np.testing.assert_array_equal(bits(into), bits(expected))
        in_place = values.copy()
        normalize_channel(in_place, inside, spec, out=in_place)
        np.testing.assert_array_equal(bits(in_place), bits(expected))


@pytest.mark.parametrize("seq", SEQUENCES)
def test_normalize_channel_keeps_numpy_semantics_for_nan_inf_and_signed_zero(seq: str) -> None:
    """The fused pass and the masked order statistics follow numpy where it is subtle: NaN propagates
    (percentiles and clip), infinities, and ``np.clip`` turning -0.0 at a 0 bound into +0.0."""
    rng = np.random.default_rng(7)
    spec = NORMALIZATION[seq]
    shape = (8, 64, 64)
    for case in range(4):
        values = rng.gamma(2.0, 200.0, shape).astype(np.float32)
        # signed zeros, too few to be the 1st percentile (numpy's partition and the band's may pick either
        # zero there: equal values, as before this pass existed)
        values.reshape(-1)[::997] = -0.0
        values.reshape(-1)[::991] = 0.0
        if case >= 1:
            values[0, 0, :3] = (np.inf, -np.inf, np.float32(spec.clip_max))
        if case >= 2:
            values[3, 5, 7] = np.nan
        inside = rng.random(shape) > (0.5 if case == 3 else 0.1)
        expected, expected_params = reference_normalize_channel(values.copy(), inside, spec)
        got, params = normalize_channel(values.copy(), inside, spec)
        np.testing.assert_array_equal(bits(got), bits(expected), err_msg=f"case {case}")
        assert json.dumps(params, sort_keys=True) == json.dumps(expected_params, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# End to end: the pipeline against the reference steps, sequential and threaded, both grids
# --------------------------------------------------------------------------------------------------
def _run_all(cases: list[Path]) -> list[tuple[np.ndarray, dict[str, Any]]]:
    out = []
    for case in cases:
        for grid in (DEFAULT_GRID, REALISTIC_GRID):
            for threads in (1, 3):
                res = preprocess_study(case / "dicom", PreprocessSettings(grid=grid, channel_threads=threads))
                out.append((res.tensor, res.meta["normalization"]))
    return out


def _reference_resample_array_with_mask(
    array_kji: np.ndarray,
    origin_lps_mm: Any,
    direction: Any,
    spacing_mm_ijk: Any,
    geometry: GridGeometry,
    default_value: float = 0.0,
    out: Any = None,
    inside: Any = None,
    k_range: Any = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The pipeline's resampler call done with SimpleITK's resampler and the voxel-wise mask."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=np.float32))
    image.SetOrigin(tuple(origin_lps_mm))
    image.SetDirection(tuple(direction))
    image.SetSpacing(tuple(spacing_mm_ijk))
    values = reference_resample_to_grid(image, geometry)
    mask = reference_inside_fov_mask(image, geometry)
    a, b = k_range if k_range is not None else (0, values.shape[0])
    out[a:b] = values[a:b]
    inside[a:b] = mask[a:b]
    return out, inside, int(mask[a:b].sum())


def test_pipeline_normalization_equals_reference_steps_on_synthetic_studies(
    synthetic_dataset: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same resampled values in, the fused normalization gives the numpy reference's tensor bit for bit,
    sequential and threaded, at both grids."""
    fast = _run_all(synthetic_dataset)
    with monkeypatch.context() as m:

        def ref_normalize(values: np.ndarray, inside: np.ndarray, spec: NormalizationSpec, out: Any = None) -> Any:
            result, params = reference_normalize_channel(values, inside, spec)
            out[...] = result
            return out, params

        m.setattr(pipeline_mod, "normalize_channel", ref_normalize)
        reference = _run_all(synthetic_dataset)
        m.setattr(pipeline_mod, "resample_array_with_mask", _reference_resample_array_with_mask)
        old_way = _run_all(synthetic_dataset)
    assert len(fast) == len(reference) == len(old_way) == 4 * len(synthetic_dataset)
    for (tensor, norm), (ref_tensor, ref_norm), (old_tensor, old_norm) in zip(fast, reference, old_way):
        np.testing.assert_array_equal(bits(tensor), bits(ref_tensor))
        assert norm == ref_norm
        # against SimpleITK's resampling (with edge values on the FOV faces): equal to float32 rounding
        np.testing.assert_allclose(tensor, old_tensor, rtol=0, atol=1e-5)
        for seq, params in norm.items():
            for key, value in (params or {}).items():
                if isinstance(value, float):
                    assert value == pytest.approx(old_norm[seq][key], rel=1e-5, abs=1e-5), (seq, key)
                else:
                    assert value == old_norm[seq][key], (seq, key)


def test_realistic_grid_through_preprocess_study(synthetic_case: Path) -> None:
    res = preprocess_study(synthetic_case / "dicom", PreprocessSettings(grid=REALISTIC_GRID))
    assert res.tensor.shape == (3, 24, 256, 256) and res.tensor.dtype == np.float32
    assert res.geometry.size_ijk == (256, 256, 24)
    assert res.geometry.spacing_mm_ijk == (0.5, 0.5, 3.0)
    assert res.meta["grid_spec"] == REALISTIC_GRID.to_dict()
    assert np.isfinite(res.tensor).all()
    timings = res.meta["timings_s"]
    assert {"resample", "normalize"} <= set(timings)
    assert sum(v for k, v in timings.items() if k != "total") <= timings["total"] * 1.01 + 1e-3  # wall, not summed
    sequential = preprocess_study(
        synthetic_case / "dicom", PreprocessSettings(grid=REALISTIC_GRID, channel_threads=1)
    ).tensor
    np.testing.assert_array_equal(bits(res.tensor), bits(sequential))
