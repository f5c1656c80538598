"""Speed-ups of issue 9 change no result: each new path against the code it replaces, bit for bit.

* decoding only the source slices the resampling reads (``grid.source_slices_needed``,
  ``decode_frames(..., needed)``) against decoding every slice;
* the fast reader on encapsulated (compressed) files: ``tests/test_preprocess_fast_dicom.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from contract import DEFAULT_GRID, REALISTIC_GRID, GridGeometry, GridSpec
from preprocessing import grid as grid_mod
from preprocessing.errors import PreprocessError
from preprocessing.pipeline import PreprocessSettings, preprocess_study


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def random_rotation(rng: np.random.Generator, max_angle: float = np.pi) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _image(rng: np.random.Generator, direction: np.ndarray, size_ijk: tuple[int, int, int]) -> sitk.Image:
    image = sitk.GetImageFromArray(rng.gamma(2.0, 200.0, size_ijk[::-1]).astype(np.float32))
    image.SetSpacing([float(v) for v in rng.uniform(0.5, 4.0, 3)])
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin([float(v) for v in rng.uniform(-20, 20, 3)])
    return image


def _geometry_of(image: sitk.Image) -> tuple[Any, Any, Any, Any]:
    return image.GetOrigin(), image.GetDirection(), image.GetSpacing(), image.GetSize()


def test_resampling_reads_no_slice_outside_source_slices_needed() -> None:
    """Slices outside the range are set to NaN: one read would put a NaN into the output."""
    rng = np.random.default_rng(9)
    reduced = 0
    for trial in range(300):
        size_ijk = (int(rng.integers(8, 40)), int(rng.integers(8, 40)), int(rng.integers(2, 30)))
        src_dir = random_rotation(rng, max_angle=[0.0, 0.1, np.pi][trial % 3])
        image = _image(rng, src_dir, size_ijk)
        spec_spacing = rng.uniform(0.4, 4.0, 3)
        if trial % 4 == 0:  # the grid placed on this image (the T2W case): slice positions coincide
            spec = GridSpec(
                size_dhw=(int(rng.integers(1, size_ijk[2] + 3)), 17, 19),
                spacing_mm_dhw=(image.GetSpacing()[2], float(spec_spacing[1]), float(spec_spacing[2])),
            )
            geometry = grid_mod.grid_geometry_for(image, spec)
        else:
            grid_dir = src_dir @ random_rotation(rng, max_angle=[0.0, 0.1, np.pi][(trial // 3) % 3])
            geometry = GridGeometry(
                origin_lps_mm=tuple(float(v) for v in np.asarray(image.GetOrigin()) + rng.uniform(-30, 30, 3)),  # type: ignore[arg-type]
                direction=tuple(float(v) for v in grid_dir.ravel()),
                spacing_mm_ijk=tuple(float(v) for v in spec_spacing),  # type: ignore[arg-type]
                size_ijk=(int(rng.integers(1, 30)), int(rng.integers(1, 30)), int(rng.integers(1, 20))),
            )
        start, stop = grid_mod.source_slices_needed(*_geometry_of(image), geometry)
        assert 0 <= start <= stop <= size_ijk[2]
        reduced += stop - start < size_ijk[2]
        expected = grid_mod.resample_to_grid(image, geometry)
        masked = sitk.GetArrayFromImage(image)
        masked[:start] = np.nan
        masked[stop:] = np.nan
        poisoned = sitk.GetImageFromArray(masked)
        poisoned.CopyInformation(image)
        np.testing.assert_array_equal(bits(grid_mod.resample_to_grid(poisoned, geometry)), bits(expected))
    assert reduced > 50  # the range was a proper subset often enough to test something


def test_grid_geometry_of_equals_grid_geometry_for() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        image = _image(rng, random_rotation(rng), (int(rng.integers(2, 60)), 31, int(rng.integers(2, 40))))
        for spec in (DEFAULT_GRID, REALISTIC_GRID):
            assert grid_mod.grid_geometry_of(*_geometry_of(image), spec) == grid_mod.grid_geometry_for(image, spec)


def test_pipeline_decoding_needed_slices_equals_decoding_all(
    synthetic_dataset: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run() -> list[tuple[np.ndarray, dict[str, object]]]:
        return [
            (res.tensor, res.meta["normalization"])
            for case in synthetic_dataset
            for grid in (DEFAULT_GRID, REALISTIC_GRID)
            for res in [preprocess_study(case / "dicom", PreprocessSettings(grid=grid))]
        ]

    calls: list[tuple[int, int, int]] = []
    needed = grid_mod.source_slices_needed

    def spy(*args: object, **kwargs: object) -> tuple[int, int]:
        start, stop = needed(*args, **kwargs)  # type: ignore[arg-type]
        calls.append((start, stop, int(args[3][2])))  # type: ignore[index]
        return start, stop

    with monkeypatch.context() as m:
        m.setattr(grid_mod, "source_slices_needed", spy)
        fast = run()
    assert any(stop - start < n for start, stop, n in calls)  # slices were skipped somewhere
    with monkeypatch.context() as m:
        m.setattr(grid_mod, "source_slices_needed", lambda *args, **kwargs: (0, int(args[3][2])))
        reference = run()
    for (tensor, norm), (ref_tensor, ref_norm) in zip(fast, reference, strict=True):
        np.testing.assert_array_equal(bits(tensor), bits(ref_tensor))
        assert norm == ref_norm


def test_decoding_in_worker_processes_equals_decoding_in_process(tmp_path: Path) -> None:
    from preprocessing import parallel_decode
    from preprocessing.testing import encode
    from synth.generator import synthesize_study, write_study

    dicom = write_study(synthesize_study(7, 0), tmp_path / "plain") / "dicom"
    encoded = tmp_path / "j2k"
    for path in sorted(p for p in dicom.rglob("*") if p.is_file()):
        target = encoded / path.relative_to(dicom)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode(path.read_bytes(), "jpeg2000"))
    reference = preprocess_study(encoded, PreprocessSettings(decode_workers=0))
    in_workers = preprocess_study(encoded, PreprocessSettings(decode_workers=2))
    assert parallel_decode._pool is not None and not parallel_decode._broken  # the pool was really used
    np.testing.assert_array_equal(bits(in_workers.tensor), bits(reference.tensor))
    assert in_workers.meta["normalization"] == reference.meta["normalization"]
    np.testing.assert_array_equal(bits(preprocess_study(dicom).tensor), bits(reference.tensor))

    # damaged frames: the same typed error, naming the same (first) file, from the workers as in process
    t2w = max((d for d in encoded.iterdir() if d.is_dir()), key=lambda d: sum(f.stat().st_size for f in d.iterdir()))
    for victim in t2w.iterdir():
        data = bytearray(victim.read_bytes())
        soc = data.index(b"\xff\x4f\xff\x51")  # the codestream's SOC + SIZ markers
        data[soc : soc + 4] = bytes(4)  # no longer a JPEG 2000 codestream: the decoder fails
        victim.write_bytes(bytes(data))
    messages = []
    for workers in (0, 2):
        with pytest.raises(PreprocessError) as err:
            preprocess_study(encoded, PreprocessSettings(decode_workers=workers))
        messages.append((type(err.value), str(err.value)))
    assert messages[0] == messages[1] and "cannot decode pixel data" in messages[0][1]
