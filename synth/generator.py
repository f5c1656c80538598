"""Synthetic prostate mpMRI studies (DICOM datasets + ground truth), deterministic per ``(seed, index)``.

Public API::

    synthesize_study(seed, index=0, config=SynthConfig()) -> SyntheticStudy  # in memory
    write_study(study, case_dir) -> Path         # DICOM + ground_truth.json + lesions.nii.gz
    generate_dataset(out_dir, cases, seed, config=SynthConfig()) -> list[Path]

Study ``i`` of ``generate_dataset(seed=S)`` equals ``synthesize_study(S, i)``. See
docs/synthetic_studies.md for what is modelled (and what is not).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage

from contract import GridGeometry
from contract.errors import MpmriError
from synth import anatomy as anat
from synth import artifacts
from synth.dicom_writer import Instance, StudyTags, build_series, slice_geometries, study_uid, write_datasets
from synth.protocol import Protocol, ProtocolOptions, SeriesPlan, adc_fit_b_values, sample_protocol

log = logging.getLogger(__name__)

#: bump whenever the same (seed, index) yields different studies; training caches are keyed on it
#: ("2": PI-RADS v2.1 zone logic: stromal BPH, haemorrhage, variable PZ cancer T2, ill-defined TZ cancer;
#: "3": rectal-gas susceptibility artifact on the EPI DWI, incidental cysts with T2 shine-through)
GENERATOR_VERSION = "3"
GROUND_TRUTH_FILE = "ground_truth.json"
LABEL_FILE = "lesions.nii.gz"
DICOM_DIR = "dicom"
F32 = np.float32


class SynthError(MpmriError):
    """Invalid synthesis request (bad seed, case count, output folder)."""


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Every knob of the generator (defaults = the documented dataset).

    Attributes:
        anatomy: gland/zone/lesion ranges and lesion frequencies (:class:`synth.anatomy.AnatomyRanges`).
        protocol: optional series, obliquity, DWI layout (:class:`synth.protocol.ProtocolOptions`).
        dwi_artifact: rectal-gas susceptibility artifact of the DWI (:class:`synth.artifacts.DwiArtifactRanges`);
            drawn from its own random stream, so the rest of a study does not depend on it.
        intensity_scale_range: per-study global factor on T2W and (independently) DWI signal.
        bias_field_strength: amplitude of the smooth multiplicative bias field (log scale).
        t2w_noise_range: T2W Gaussian (-> Rician) noise sigma as a fraction of the PZ signal.
        dwi_noise_range: DWI noise sigma at b=0 as a fraction of the PZ b=0 signal.
        dwi_high_b_noise_factor: noise factor for b >= 500 (more averages at high b).
        dwi_psf_sigma_vox: Gaussian PSF of the DWI/ADC acquisition, voxels ``(slice, row, col)``.
        adc_background_snr: ADC is set to 0 where the lowest-b signal is below this many sigmas.
        t2w_acquired_fraction: T2W is rendered on a grid this many times coarser in-plane and
            interpolated to the stored matrix (like scanner zero-fill interpolation; also for speed).
        gland_center_range_mm: range of the gland centre in LPS (x, y, z) around the isocentre.
        scanner_headers_every: studies whose ``index % n == n - 1`` carry realistic scanner headers
            (:func:`synth.dicom_writer.add_scanner_headers`: nested sequences, a Siemens CSA header, GE /
            Philips private groups); 2 = every other study, 1 = all, 0 = none. Draws no random numbers,
            so the images of every study are the same either way.
    """

    anatomy: anat.AnatomyRanges = anat.AnatomyRanges()
    protocol: ProtocolOptions = ProtocolOptions()
    dwi_artifact: artifacts.DwiArtifactRanges = artifacts.DwiArtifactRanges()
    intensity_scale_range: tuple[float, float] = (0.4, 2.5)
    bias_field_strength: float = 0.15
    t2w_noise_range: tuple[float, float] = (0.015, 0.035)
    dwi_noise_range: tuple[float, float] = (0.012, 0.025)
    dwi_high_b_noise_factor: float = 0.6
    dwi_psf_sigma_vox: tuple[float, float, float] = (0.35, 0.55, 0.55)
    adc_background_snr: float = 4.0
    t2w_acquired_fraction: int = 2
    gland_center_range_mm: tuple[tuple[float, float], ...] = ((-15.0, 15.0), (-10.0, 30.0), (-40.0, 40.0))
    scanner_headers_every: int = 2


@dataclasses.dataclass
class SyntheticStudy:
    """One synthetic study in memory.

    Attributes:
        case_id: ``f"synth-{seed}-{index:04d}"``.
        series: series key ("t2w_tra", "t2w_sag", "t2w_cor", "dwi", "dwi_lowb", "adc", "localizer")
            -> its datasets (file meta set; ready for ``dcmwrite``).
        truth: exactly what ``ground_truth.json`` holds.
        label_image: uint8 lesion labels on the axial T2W grid: 0 background, ``i`` = ``truth["lesions"][i-1]``.
        anatomy: the sampled anatomy (for tests and analysis; not written to disk).
        dwi_artifact: the DWI susceptibility artifact, None when absent (for tests and analysis).
    """

    case_id: str
    series: dict[str, list[pydicom.Dataset]]
    truth: dict[str, Any]
    label_image: sitk.Image
    anatomy: anat.Anatomy | None = None
    dwi_artifact: artifacts.DwiArtifact | None = None


def case_id_for(seed: int, index: int) -> str:
    return f"synth-{seed}-{index:04d}"


def _check_seed(seed: object, index: object) -> None:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(index, int | np.integer) or index < 0:
        raise SynthError(f"index must be a non-negative integer, got {index!r}")


# --------------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------------
def synthesize_study(seed: int, index: int = 0, config: SynthConfig = SynthConfig()) -> SyntheticStudy:  # noqa: B008
    """Synthesize study ``index`` of the dataset ``seed`` in memory (no disk access). Deterministic."""
    _check_seed(seed, index)
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])
    center = np.array([rng.uniform(lo, hi) for lo, hi in config.gland_center_range_mm])
    anatomy = anat.sample_anatomy(rng, center, config.anatomy)
    anatomy = anat.add_incidental_cyst(np.random.default_rng([int(seed), int(index), 0xC757]), anatomy, config.anatomy)
    half = np.array([anatomy.gland.half_extent_mm(e) for e in np.eye(3)])
    protocol = sample_protocol(rng, center, half, config.protocol)
    tags = _study_tags(rng, seed, index)
    pz = anatomy.tissues["pz"]
    t2_scale = _log_uniform(rng, config.intensity_scale_range)
    dwi_scale = _log_uniform(rng, config.intensity_scale_range)
    t2_sigma = float(rng.uniform(*config.t2w_noise_range)) * pz.t2 * t2_scale
    dwi_sigma = float(rng.uniform(*config.dwi_noise_range)) * pz.s0 * dwi_scale
    t2_bias = _bias_params(rng, config.bias_field_strength)
    dwi_bias = _bias_params(rng, config.bias_field_strength)
    noise_rng = np.random.default_rng([int(seed), int(index), 0x0153])
    artifact_rng = np.random.default_rng([int(seed), int(index), 0xA27F])
    dwi_artifact = artifacts.sample_dwi_artifact(artifact_rng, anatomy, config.dwi_artifact)

    series: dict[str, list[pydicom.Dataset]] = {}
    truth_series: list[dict[str, Any]] = []
    dwi_images: dict[float, np.ndarray] | None = None
    study_time = _dt.datetime.strptime(tags.study_time, "%H%M%S")
    for n, plan in enumerate(protocol.series):
        series_time = (study_time + _dt.timedelta(seconds=60 + 240 * n)).strftime("%H%M%S")
        if plan.sequence == "t2w":
            vol = _render_t2w(anatomy, plan.geometry, config, t2_scale, t2_sigma, t2_bias, center, noise_rng)
            instances = [Instance(g, vol[k]) for k, g in enumerate(slice_geometries(plan.geometry))]
        elif plan.key == "localizer":
            instances = []
            for g in plan.localizer_slices:
                t2 = anat.render(anatomy, g, fields=("t2",)).t2
                assert t2 is not None
                img = _rician(t2 * F32(t2_scale) * _bias(g, t2_bias, center), t2_sigma * 1.5, noise_rng)
                instances.append(Instance(g, img[0]))
        elif plan.sequence == "dwi" or plan.sequence == "adc":
            if dwi_images is None:
                dwi_images = _render_dwi(
                    anatomy, protocol, config, dwi_scale, dwi_sigma, dwi_bias, center, noise_rng, dwi_artifact
                )
            slices = slice_geometries(plan.geometry)
            if plan.sequence == "dwi":
                instances = [Instance(g, dwi_images[b][k], b) for b in plan.b_values for k, g in enumerate(slices)]
            else:
                adc = _adc_map(dwi_images, adc_fit_b_values(protocol), dwi_sigma, config.adc_background_snr)
                instances = [Instance(g, adc[k]) for k, g in enumerate(slices)]
        else:  # pragma: no cover - protocol only produces the kinds above
            raise SynthError(f"unknown series kind {plan.key!r}")
        order = rng.permutation(len(instances)) if plan.shuffle_instances else np.arange(len(instances), dtype=np.int64)
        headers = config.scanner_headers_every > 0 and index % config.scanner_headers_every == (
            config.scanner_headers_every - 1
        )
        datasets = build_series(plan, instances, tags, protocol, series_time, order, scanner_headers=headers)
        series[plan.key] = datasets
        truth_series.append(_series_truth(plan, datasets))

    t2_geom = next(p.geometry for p in protocol.series if p.key == "t2w_tra")
    label = anat.lesion_label_map(anatomy, t2_geom)
    label_image = _to_sitk(label, t2_geom)
    truth = _truth(seed, index, tags, protocol, anatomy, truth_series)
    truth.update(artifacts.artifact_truth(dwi_artifact))
    return SyntheticStudy(case_id_for(seed, index), series, truth, label_image, anatomy, dwi_artifact)


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1]))))


def _bias_params(rng: np.random.Generator, strength: float) -> tuple[np.ndarray, float]:
    return rng.normal(0.0, strength, size=3), float(rng.uniform(-strength, 0.5 * strength))


def _bias(geom: GridGeometry, params: tuple[np.ndarray, float], center: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias field ``exp(g.q + h |q|^2)``, ``q = (p - center) / 100 mm``."""
    g, h = params
    q = anat.local_coords(geom, anat.full_block(geom), center, np.eye(3), np.full(3, 100.0))
    log_b = q[0] * F32(g[0]) + q[1] * F32(g[1]) + q[2] * F32(g[2])
    log_b += F32(h) * (q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
    return np.exp(log_b)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` + complex Gaussian noise of std ``sigma`` per channel."""
    re = rng.standard_normal(signal.shape, dtype=F32)
    re *= F32(sigma)
    re += signal
    im = rng.standard_normal(signal.shape, dtype=F32)
    im *= F32(sigma)
    return np.hypot(re, im)


def _upsample2(a: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation to twice the samples along ``axis`` (pixel-edge aligned, edges clamped)."""
    a = np.moveaxis(a, axis, 0)
    prev = np.concatenate([a[:1], a[:-1]], axis=0)
    nxt = np.concatenate([a[1:], a[-1:]], axis=0)
    out = np.empty((2 * a.shape[0], *a.shape[1:]), dtype=a.dtype)
    out[0::2] = F32(0.75) * a + F32(0.25) * prev
    out[1::2] = F32(0.75) * a + F32(0.25) * nxt
    return np.moveaxis(out, 0, axis)


def acquired_geometry(geom: GridGeometry, factor: int) -> GridGeometry:
    """The coarser in-plane grid (``factor`` x spacing) covering the same field of view as ``geom``."""
    si, sj, sk = geom.spacing_mm_ijk
    d = geom.direction_matrix
    shift = 0.5 * (factor - 1) * (si * d[:, 0] + sj * d[:, 1])
    ni, nj, nk = geom.size_ijk
    return GridGeometry(
        origin_lps_mm=tuple(float(v) for v in np.asarray(geom.origin_lps_mm) + shift),  # type: ignore[arg-type]
        direction=geom.direction,
        spacing_mm_ijk=(si * factor, sj * factor, sk),
        size_ijk=(ni // factor, nj // factor, nk),
    )


def _render_t2w(
    anatomy: anat.Anatomy,
    geom: GridGeometry,
    config: SynthConfig,
    scale: float,
    sigma: float,
    bias: tuple[np.ndarray, float],
    center: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    factor = config.t2w_acquired_fraction
    use_coarse = factor == 2 and geom.size_ijk[0] % 2 == 0 and geom.size_ijk[1] % 2 == 0
    g = acquired_geometry(geom, 2) if use_coarse else geom
    t2 = anat.render(anatomy, g, fields=("t2",)).t2
    assert t2 is not None
    t2 *= _bias(g, bias, center)
    t2 *= F32(scale)
    if use_coarse:
        t2 = _upsample2(_upsample2(t2, 1), 2)
    return _rician(t2, sigma, rng)


def _render_dwi(
    anatomy: anat.Anatomy,
    protocol: Protocol,
    config: SynthConfig,
    scale: float,
    sigma: float,
    bias: tuple[np.ndarray, float],
    center: np.ndarray,
    rng: np.random.Generator,
    artifact: artifacts.DwiArtifact | None = None,
) -> dict[float, np.ndarray]:
    """Noisy DWI volumes on the DWI grid for every stored and ADC-fit b-value: ``S0 exp(-b ADC)``.

    ``artifact`` (if any) distorts the noise-free S0/ADC maps first; its gain scales every b-value alike.
    """
    geom = next(p.geometry for p in protocol.series if p.sequence == "adc")
    maps = anat.render(anatomy, geom, fields=("s0", "adc"))
    assert maps.s0 is not None and maps.adc is not None
    if artifact is not None:
        artifacts.apply_dwi_artifact(artifact, geom, maps.s0, maps.adc)
    b_values = sorted({b for p in protocol.series for b in p.b_values} | set(adc_fit_b_values(protocol)))
    gain = _bias(geom, bias, center) * F32(scale)
    out: dict[float, np.ndarray] = {}
    for b in b_values:
        signal = maps.s0 * np.exp(maps.adc * F32(-b * 1e-6))
        signal = ndimage.gaussian_filter(signal, config.dwi_psf_sigma_vox, mode="nearest")
        noise = sigma * (config.dwi_high_b_noise_factor if b >= 500 else 1.0)
        out[float(b)] = _rician(signal * gain, noise, rng)
    return out


def _adc_map(images: dict[float, np.ndarray], b_values: tuple[float, ...], sigma: float, snr: float) -> np.ndarray:
    """Log-linear least-squares ADC (1e-6 mm^2/s) from the noisy DWI, 0 in the background."""
    b = np.asarray(b_values, dtype=np.float64)
    db = b - b.mean()
    den = float(np.sum(db**2))
    logs = [np.log(np.maximum(images[float(v)], F32(1e-3))) for v in b]
    mean_log = sum(logs) / len(logs)
    slope = sum(F32(d) * (lg - mean_log) for d, lg in zip(db, logs, strict=True)) / F32(den)
    adc = np.clip(-slope * F32(1e6), 0.0, 4000.0)
    adc[images[float(b.min())] < snr * sigma] = 0.0
    return adc


def _study_tags(rng: np.random.Generator, seed: int, index: int) -> StudyTags:
    date = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    age = int(rng.integers(48, 82))
    birth = date - _dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    time = _dt.time(int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    return StudyTags(
        seed=seed,
        index=index,
        study_instance_uid=study_uid(seed, index, "study"),
        frame_of_reference_uid=study_uid(seed, index, "frame_of_reference"),
        patient_name=f"SYNTH^CASE{index + 1:04d}",
        patient_id=case_id_for(seed, index).upper(),
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_age=f"{age:03d}Y",
        patient_weight_kg=float(np.round(rng.uniform(60, 110), 1)),
        study_date=date.strftime("%Y%m%d"),
        study_time=time.strftime("%H%M%S"),
        accession_number=f"SYN{seed % 100000:05d}{index:05d}",
    )


def _series_truth(plan: SeriesPlan, datasets: list[pydicom.Dataset]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "key": plan.key,
        "series_instance_uid": str(datasets[0].SeriesInstanceUID),
        "series_description": plan.description,
        "protocol_name": plan.protocol_name,
        "sequence": plan.sequence,
        "plane": plan.plane,
        "num_instances": len(datasets),
        "series_number": plan.series_number,
    }
    if plan.sequence == "dwi":
        entry["b_values"] = [float(b) for b in plan.b_values]
    return entry


def _truth(
    seed: int,
    index: int,
    tags: StudyTags,
    protocol: Protocol,
    anatomy: anat.Anatomy,
    series: list[dict[str, Any]],
) -> dict[str, Any]:
    lesions: list[dict[str, Any]] = []
    for i, lesion in enumerate(anatomy.lesions, start=1):
        lesions.append(
            {
                "label": i,
                "center_lps_mm": [round(float(v), 4) for v in lesion.shape.center_lps_mm],
                "diameter_mm": round(lesion.diameter_mm, 3),
                "significant": bool(lesion.significant),
                "pirads": int(lesion.pirads),
                "kind": lesion.kind,
                "zone": lesion.zone,
                "adc_um2_per_s": round(float(lesion.tissue.adc), 1),
                "dwi_contrast": round(float(lesion.dwi_contrast), 3),
                "t2_contrast": round(float(lesion.tissue.t2 / anatomy.tissues[lesion.zone].t2), 3),
                "rim": lesion.rim_t2 is not None,
                "edge_mm": round(float(lesion.edge_mm), 3),
            }
        )
    gl = anatomy.gland
    return {
        "case_id": case_id_for(seed, index),
        "seed": int(seed),
        "index": int(index),
        "generator_version": GENERATOR_VERSION,
        "study_instance_uid": tags.study_instance_uid,
        "frame_of_reference_uid": tags.frame_of_reference_uid,
        "manufacturer": protocol.manufacturer,
        "oblique": protocol.oblique,
        "significant": any(les["significant"] for les in lesions),
        "max_pirads": max([1] + [int(les["pirads"]) for les in lesions]),
        "label_file": LABEL_FILE,
        "gland": {
            "center_lps_mm": [round(float(v), 4) for v in gl.center_lps_mm],
            "semi_axes_mm": [round(float(v), 4) for v in gl.semi_axes_mm],
            "direction": [round(float(v), 8) for v in gl.rotation.reshape(-1)],
        },
        "series": series,
        "lesions": lesions,
    }


def _to_sitk(label: np.ndarray, geom: GridGeometry) -> sitk.Image:
    img = sitk.GetImageFromArray(label)
    img.SetOrigin(tuple(float(v) for v in geom.origin_lps_mm))
    img.SetSpacing(tuple(float(v) for v in geom.spacing_mm_ijk))
    img.SetDirection(tuple(float(v) for v in geom.direction))
    return img


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def write_study(study: SyntheticStudy, case_dir: Path) -> Path:
    """Write ``case_dir/dicom/<series number>/<instance number>.dcm``, ground_truth.json and lesions.nii.gz.

    An existing ``case_dir/dicom`` is replaced: files of an earlier study (e.g. another generator version, same
    UIDs, other pixels) must not mix into this one.
    """
    case_dir = Path(case_dir)
    try:
        shutil.rmtree(case_dir / DICOM_DIR, ignore_errors=True)
        case_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SynthError(f"cannot create {case_dir}: {err.strerror}") from err
    for datasets in study.series.values():
        folder = case_dir / DICOM_DIR / f"{int(datasets[0].SeriesNumber):03d}"
        write_datasets(datasets, folder, [f"{int(ds.InstanceNumber)}.dcm" for ds in datasets])
    (case_dir / GROUND_TRUTH_FILE).write_text(json.dumps(study.truth, indent=2) + "\n")
    sitk.WriteImage(study.label_image, str(case_dir / LABEL_FILE), useCompression=True)
    return case_dir


def generate_dataset(out_dir: Path, cases: int, seed: int, config: SynthConfig = SynthConfig()) -> list[Path]:  # noqa: B008
    """Write ``cases`` studies ``out_dir/<case_id>/...``; study ``i`` equals ``synthesize_study(seed, i)``."""
    if not isinstance(cases, int | np.integer) or cases < 1:
        raise SynthError(f"cases must be a positive integer, got {cases!r}")
    _check_seed(seed, 0)
    out = Path(out_dir)
    paths = []
    for index in range(int(cases)):
        study = synthesize_study(seed, index, config)
        paths.append(write_study(study, out / study.case_id))
    return paths


def load_truth(case_dir: Path) -> dict[str, Any]:
    """Read ``case_dir/ground_truth.json``."""
    path = Path(case_dir) / GROUND_TRUTH_FILE
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError as err:
        raise SynthError(f"no {GROUND_TRUTH_FILE} in {case_dir}") from err
