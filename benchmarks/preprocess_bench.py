"""Benchmark: one synthetic mpMRI study, DICOM -> normalized model tensor ``[S, D, H, W]``.

Compares in one run, on the same study and the same output grid (contract.DEFAULT_GRID):

* ``mpmri`` -- ``preprocessing.preprocess_study`` from in-memory DICOM bytes (what the gRPC service
  receives) and from the folder; with its stage breakdown (``meta["timings_s"]``);
* ``picai_prep dcm2mha`` -- picai_prep's own pipeline: ``Dicom2MHAConverter`` over every series folder of
  the study (metadata extraction, mapping by SeriesDescription as a site would configure it, MHA files
  written), then the MHA files read back, ``Sample.preprocess`` (resample spacing, centre crop, resample
  to the first scan) and percentile normalization with numpy;
* ``picai_prep reader only`` -- a lower bound for picai_prep: ``DICOMImageReader`` (SimpleITK/GDCM) on the
  three series folders our selection chose, then ``Sample.preprocess`` and normalization: no series
  selection, no MHA round trip;
* ``monai`` -- a MONAI dictionary transform chain: ``LoadImaged(PydicomReader)`` -> ``EnsureChannelFirstd``
  -> ``Spacingd`` -> ``ResampleToMatchd`` -> ``ResizeWithPadOrCropd`` -> ``ScaleIntensityRangePercentilesd``
  / ``ScaleIntensityRanged`` -> ``ConcatItemsd``.

The competitors are given the folders of the three series our series selection chose (they have no
series selection of their own), so they do strictly less work than ``mpmri``. Run::

    .venv/bin/python benchmarks/preprocess_bench.py [--repeats 7] [--markdown]

Studies are synthetic (``mpmri synth``); no patient data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import contract

#: the demo's study; a single high-b DWI series so every method reads the same three series
DEFAULT_SEED = 7
DEFAULT_INDEX = 0


def _percentile_scale(a: np.ndarray, spec: Any) -> np.ndarray:
    lo, hi = np.percentile(a, [spec.lower_percentile, spec.upper_percentile])
    return np.clip((a - lo) / max(hi - lo, 1e-6), spec.clip_min, spec.clip_max).astype(np.float32)


def _normalize_numpy(channels: dict[str, np.ndarray]) -> np.ndarray:
    out = []
    for name in contract.SEQUENCES:
        spec = contract.NORMALIZATION[name]
        a = channels[name].astype(np.float32)
        if isinstance(spec, contract.FixedScaleNormalization):
            out.append(np.clip(a / spec.divisor, spec.clip_min, spec.clip_max))
        else:
            out.append(_percentile_scale(a, spec))
    return np.stack(out)


def run_mpmri_bytes(blobs: list[bytes]) -> tuple[np.ndarray, dict[str, float]]:
    from preprocessing.pipeline import preprocess_study

    res = preprocess_study(blobs)
    return res.tensor, dict(res.meta["timings_s"])


def run_mpmri_folder(folder: Path) -> tuple[np.ndarray, dict[str, float]]:
    from preprocessing.pipeline import preprocess_study

    res = preprocess_study(folder)
    return res.tensor, dict(res.meta["timings_s"])


def _picai_resample_normalize(scans: list[Any]) -> tuple[np.ndarray, dict[str, float]]:
    """picai_prep's ``Sample.preprocess`` onto the contract grid (linear), then percentile/fixed scaling."""
    import SimpleITK as sitk
    from picai_prep.preprocessing import PreprocessingSettings, Sample

    t0 = time.perf_counter()
    settings = PreprocessingSettings(
        matrix_size=list(contract.DEFAULT_GRID.size_dhw),
        spacing=list(contract.DEFAULT_GRID.spacing_mm_dhw),
        scan_interpolator=sitk.sitkLinear,
    )
    sample = Sample(scans=scans, settings=settings)
    sample.preprocess()
    t1 = time.perf_counter()
    tensor = _normalize_numpy({s: sitk.GetArrayFromImage(img) for s, img in zip(contract.SEQUENCES, sample.scans)})
    return tensor, {"resample": t1 - t0, "normalize": time.perf_counter() - t1}


def run_picai_prep(series_dirs: dict[str, Path]) -> tuple[np.ndarray, dict[str, float]]:
    from picai_prep.dcm2mha import DICOMImageReader

    t0 = time.perf_counter()
    scans = [DICOMImageReader(series_dirs[s], verify_dicom_filenames=False).image for s in contract.SEQUENCES]
    t1 = time.perf_counter()
    tensor, stages = _picai_resample_normalize(scans)
    return tensor, {"read": t1 - t0, **stages}


#: dcm2mha mappings a site would configure for the vendor naming styles of the synthetic studies
PICAI_MAPPINGS: dict[str, dict[str, list[str]]] = {
    "t2w": {"SeriesDescription": ["t2_tse_tra", "Ax T2 FRFSE", "T2W_TSE_ax"]},
    "adc": {"SeriesDescription": ["ep2d_diff_b50_400_800_1400_ADC", "Apparent Diffusion Coefficient (mm2/s)", "dADC"]},
    "dwi": {"SeriesDescription": ["ep2d_diff_b1400_TRACEW", "Ax DWI b1400", "sDWI b1400"]},
}


def run_picai_dcm2mha(dicom_dir: Path, work_dir: Path) -> tuple[np.ndarray, dict[str, float]]:
    import shutil

    import SimpleITK as sitk
    from picai_prep.dcm2mha import Dicom2MHAConverter

    shutil.rmtree(work_dir, ignore_errors=True)
    archive = [
        {"patient_id": "p0", "study_id": "s0", "path": str(d.relative_to(dicom_dir))}
        for d in sorted(dicom_dir.iterdir())
        if d.is_dir()
    ]
    t0 = time.perf_counter()
    Dicom2MHAConverter(
        input_dir=dicom_dir,
        output_dir=work_dir,
        dcm2mha_settings={
            "mappings": PICAI_MAPPINGS,
            "archive": archive,
            "options": {"verify_dicom_filenames": False, "num_threads": 2, "verbose": 0},
        },
    ).convert()
    scans = [sitk.ReadImage(str(work_dir / "p0" / f"p0_s0_{s}.mha")) for s in contract.SEQUENCES]
    t1 = time.perf_counter()
    tensor, stages = _picai_resample_normalize(scans)
    return tensor, {"dcm2mha": t1 - t0, **stages}


def build_monai_chain() -> Callable[[dict[str, str]], dict[str, Any]]:
    from monai.data import PydicomReader
    from monai.transforms import (
        Compose,
        ConcatItemsd,
        EnsureChannelFirstd,
        LoadImaged,
        ResampleToMatchd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    d, h, w = contract.DEFAULT_GRID.size_dhw
    sd, sh, sw = contract.DEFAULT_GRID.spacing_mm_dhw
    keys = list(contract.SEQUENCES)
    pct = [k for k in keys if isinstance(contract.NORMALIZATION[k], contract.PercentileNormalization)]
    fixed = [k for k in keys if isinstance(contract.NORMALIZATION[k], contract.FixedScaleNormalization)]
    transforms: list[Any] = [
        LoadImaged(keys=keys, reader=PydicomReader()),  # type: ignore[arg-type]  # instances are accepted
        EnsureChannelFirstd(keys=keys),
        Spacingd(keys=["t2w"], pixdim=(sw, sh, sd), mode="bilinear"),
        ResizeWithPadOrCropd(keys=["t2w"], spatial_size=(w, h, d)),
        ResampleToMatchd(keys=[k for k in keys if k != "t2w"], key_dst="t2w", mode="bilinear"),
    ]
    for k in pct:
        spec = contract.NORMALIZATION[k]
        assert isinstance(spec, contract.PercentileNormalization)
        transforms.append(
            ScaleIntensityRangePercentilesd(
                keys=[k], lower=spec.lower_percentile, upper=spec.upper_percentile, b_min=0.0, b_max=1.0, clip=False
            )
        )
    for k in fixed:
        spec_f = contract.NORMALIZATION[k]
        assert isinstance(spec_f, contract.FixedScaleNormalization)
        transforms.append(
            ScaleIntensityRanged(keys=[k], a_min=0.0, a_max=spec_f.divisor, b_min=0.0, b_max=1.0, clip=False)
        )
    transforms.append(ConcatItemsd(keys=keys, name="image"))
    return Compose(transforms)


def run_monai(
    chain: Callable[[dict[str, str]], dict[str, Any]], series_dirs: dict[str, Path]
) -> tuple[np.ndarray, dict[str, float]]:
    t0 = time.perf_counter()
    out = chain({s: str(series_dirs[s]) for s in contract.SEQUENCES})
    image = np.asarray(out["image"])  # [S, W, H, D] in MONAI's (i, j, k) convention
    return image.transpose(0, 3, 2, 1), {"total": time.perf_counter() - t0}


def _time(
    fn: Callable[[], tuple[np.ndarray, dict[str, float]]], repeats: int
) -> tuple[list[float], list[dict[str, float]], np.ndarray]:
    fn()  # warm-up (imports, page cache)
    wall, stages = [], []
    out = np.empty(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, st = fn()
        wall.append(time.perf_counter() - t0)
        stages.append(st)
    return wall, stages, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--index", type=int, default=DEFAULT_INDEX)
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md section")
    args = parser.parse_args(argv)

    from preprocessing.pipeline import preprocess_study
    from synth.generator import synthesize_study, write_study

    with tempfile.TemporaryDirectory() as tmp:
        study = synthesize_study(args.seed, args.index)
        case_dir = write_study(study, Path(tmp) / study.case_id)
        dicom_dir = case_dir / "dicom"
        files = sorted(p for p in dicom_dir.rglob("*") if p.is_file())
        blobs = [p.read_bytes() for p in files]
        ref = preprocess_study(blobs)
        uid_to_dir = {}
        for series_dir in (p for p in dicom_dir.iterdir() if p.is_dir()):
            import pydicom

            first = next(p for p in series_dir.iterdir() if p.is_file())
            uid_to_dir[pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID] = series_dir
        series_dirs = {s: uid_to_dir[ref.meta["series"][s]["series_uid"]] for s in contract.SEQUENCES}
        n_bytes = sum(len(b) for b in blobs)

        chain = build_monai_chain()
        results: dict[str, tuple[list[float], list[dict[str, float]], np.ndarray]] = {
            "mpmri (bytes)": _time(lambda: run_mpmri_bytes(blobs), args.repeats),
            "mpmri (folder)": _time(lambda: run_mpmri_folder(dicom_dir), args.repeats),
            "picai_prep dcm2mha": _time(lambda: run_picai_dcm2mha(dicom_dir, Path(tmp) / "mha"), args.repeats),
            "picai_prep reader only (lower bound)": _time(lambda: run_picai_prep(series_dirs), args.repeats),
            "monai": _time(lambda: run_monai(chain, series_dirs), args.repeats),
        }

    ours = statistics.median(results["mpmri (bytes)"][0])
    best_other = min(statistics.median(results[k][0]) for k in ("picai_prep dcm2mha", "monai"))
    lower_bound = statistics.median(results["picai_prep reader only (lower bound)"][0])
    lines = [
        f"Machine: {platform.node() or 'unknown'} ({platform.machine()}, {_cpu_count()} cores), "
        f"Python {platform.python_version()}; date {dt.date.today().isoformat()}; "
        f"study synth seed {args.seed} index {args.index}: {len(files)} DICOM files, {n_bytes / 1e6:.1f} MB; "
        f"{args.repeats} repeats after one warm-up.",
        "",
        "| method | median s | min s | max s | time vs mpmri (bytes) | output shape | T2W/ADC/DWI corr. with mpmri |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, (wall, _stages, out) in results.items():
        med = statistics.median(wall)
        lines.append(
            f"| {name} | {med:.3f} | {min(wall):.3f} | {max(wall):.3f} | {med / ours:.1f}x | {list(out.shape)} "
            f"| {_agreement(out, results['mpmri (bytes)'][2])} |"
        )
    stage_names = list(results["mpmri (bytes)"][1][0])
    lines += [
        "",
        "mpmri (bytes) stage breakdown (median s): "
        + ", ".join(f"{k} {statistics.median(st[k] for st in results['mpmri (bytes)'][1]):.4f}" for k in stage_names),
    ]
    lines.append(
        f"Speed-up over the faster competitor (picai_prep dcm2mha, monai): {best_other / ours:.1f}x (goal >= 3x); "
        f"over picai_prep's reader alone on pre-selected series: {lower_bound / ours:.1f}x."
    )
    print("\n".join(lines))
    return 0


def _agreement(out: np.ndarray, ref: np.ndarray) -> str:
    """Pearson correlation per channel with our tensor (same grid size), as a sanity check of the same job."""
    if out.shape != ref.shape:
        return "n/a (other shape)"
    return " / ".join(f"{np.corrcoef(out[s].ravel(), ref[s].ravel())[0, 1]:.2f}" for s in range(ref.shape[0]))


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
