"""Synthetic generator: time per study and how hard the task is for a naive "lowest ADC" rule.

    .venv/bin/python benchmarks/synth_benchmark.py --cases 100 --seed 2024

Prints the mean/max time of ``synthesize_study`` and ``write_study`` per case, and the patient-level
AUROC of two hand-made rules on the true gland mask (no learning):

* ``min_adc``: score = -(lowest ADC in the inner gland after a 1-voxel Gaussian smoothing),
* ``joint``: score = max over the gland of (DWI/median DWI in gland) * (1000/ADC) * (median T2/T2) after
  resampling T2W to the ADC grid -- a crude stand-in for "T2W + ADC + DWI jointly".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from contract import GridGeometry
from synth import anatomy as anat
from synth.generator import synthesize_study, write_study


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _volume(datasets: list) -> tuple[np.ndarray, sitk.Image]:
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    w = np.cross(iop[:3], iop[3:])
    ordered = sorted(datasets, key=lambda ds: np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ w)
    vol = np.stack([ds.pixel_array * float(getattr(ds, "RescaleSlope", 1.0)) for ds in ordered]).astype(np.float32)
    img = sitk.GetImageFromArray(vol)
    img.SetOrigin([float(v) for v in ordered[0].ImagePositionPatient])
    p0 = np.asarray(ordered[0].ImagePositionPatient, dtype=np.float64)
    p1 = np.asarray(ordered[1].ImagePositionPatient, dtype=np.float64)
    row, col = (float(v) for v in ordered[0].PixelSpacing)
    img.SetSpacing((col, row, float(np.linalg.norm(p1 - p0))))
    img.SetDirection(tuple(np.stack([iop[:3], iop[3:], w], axis=1).reshape(-1)))
    return vol, img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    parser.add_argument("--write", type=int, default=10, help="also time write_study for this many cases")
    args = parser.parse_args()
    synth_s, write_s, labels, min_adc, joint = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.cases):
            t0 = time.perf_counter()
            study = synthesize_study(args.seed, index)
            synth_s.append(time.perf_counter() - t0)
            if index < args.write:
                t0 = time.perf_counter()
                write_study(study, Path(tmp) / study.case_id)
                write_s.append(time.perf_counter() - t0)
            assert study.anatomy is not None
            adc, adc_img = _volume(study.series["adc"])
            dwi_ds = study.series["dwi"]
            b_max = max(float(ds.DiffusionBValue) for ds in dwi_ds)
            dwi, _ = _volume([ds for ds in dwi_ds if float(ds.DiffusionBValue) == b_max])
            _, t2_img = _volume(study.series["t2w_tra"])
            t2 = sitk.GetArrayFromImage(sitk.Resample(t2_img, adc_img, sitk.Transform(), sitk.sitkLinear))
            # gland mask on the ADC grid from the (known) anatomy
            geom = GridGeometry(
                origin_lps_mm=adc_img.GetOrigin(),
                direction=adc_img.GetDirection(),
                spacing_mm_ijk=adc_img.GetSpacing(),
                size_ijk=adc_img.GetSize(),
            )
            # inner gland (2 voxels in-plane off the capsule) so that fat partial volume does not dominate
            gland = ndimage.binary_erosion(anat.zone_map(study.anatomy, geom) > 0, np.ones((1, 5, 5), bool))
            smooth = ndimage.gaussian_filter(adc, 1.0)
            min_adc.append(-float(smooth[gland].min()))
            d = ndimage.gaussian_filter(dwi, 1.0)
            t = ndimage.gaussian_filter(t2, 1.0)
            feat = (
                (d / np.median(d[gland]))
                * (1000.0 / np.maximum(smooth, 200.0))
                * (np.median(t[gland]) / np.maximum(t, 1))
            )
            joint.append(float(feat[gland].max()))
            labels.append(bool(study.truth["significant"]))
            if args.verbose:
                kinds = [
                    (les["kind"][:4], les["zone"], round(les["diameter_mm"]), round(les["adc_um2_per_s"]))
                    for les in study.truth["lesions"]
                ]
                print(f"{index:3d} sig={labels[-1]:d} min_adc={-min_adc[-1]:7.0f} joint={joint[-1]:6.2f} {kinds}")
    y = np.asarray(labels)
    print(f"cases={args.cases} seed={args.seed} significant={y.mean():.2f}")
    print(f"synthesize_study: mean {np.mean(synth_s):.3f} s, max {np.max(synth_s):.3f} s per case")
    if write_s:
        print(f"write_study:      mean {np.mean(write_s):.3f} s, max {np.max(write_s):.3f} s per case")
    print(f"AUROC min_adc rule: {_auroc(np.asarray(min_adc), y):.3f}")
    print(f"AUROC joint rule:   {_auroc(np.asarray(joint), y):.3f}")


if __name__ == "__main__":
    main()
