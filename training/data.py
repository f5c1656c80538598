"""Training data: synthetic studies -> DICOM -> the serving preprocessing -> cached tensors + targets.

Every case goes through exactly the code the service runs (:func:`preprocessing.pipeline.preprocess_study`
on the synthetic DICOM series), so training sees what serving sees (no train/serve skew).

Targets (PI-CAI convention):

* ``target`` ``[D, H, W]`` uint8: the *clinically significant* lesions only (``lesion.significant``),
  resampled onto the model grid with :func:`preprocessing.grid.resample_label_to_grid`.
  Insignificant lesions are background for localization, as in PI-CAI's csPCa annotations.
* ``lesion_index`` ``[D, H, W]`` uint8: all lesions, value ``i`` = ``ground_truth["lesions"][i-1]``.
* ``significant`` (study has a csPCa lesion) and ``max_pirads`` (1 when there is no lesion).

Cache layout: ``<cache_dir>/gen<GENERATOR_VERSION>/prep<PREPROCESSING_VERSION>/seed<seed>/case_<index:04d>.npz``
(one file per case, see :func:`save_case`): a new generator or pipeline version never reuses cases
synthesized or preprocessed by another one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from contract import (
    CONTRACT_VERSION,
    DEFAULT_GRID,
    MISSING_CHANNEL_FILL_VALUE,
    NUM_SEQUENCES,
    REQUIRED_SEQUENCES,
    SEQUENCES,
    GridGeometry,
    GridSpec,
)
from contract.errors import MpmriError
from preprocessing import PREPROCESSING_VERSION
from synth.generator import GENERATOR_VERSION

CACHE_FORMAT_VERSION = 1


class TrainingDataError(MpmriError):
    """A training case cannot be built or read."""


@dataclass
class CaseRecord:
    """One preprocessed case on the model grid.

    Attributes:
        case_id: ``seed<seed>_<index:04d>`` (or the case folder name for ``mpmri synth`` data).
        images: ``[S, D, H, W]`` float32 normalized images (contract normalization).
        availability: ``[S]`` float32, 1 = sequence present.
        target: ``[D, H, W]`` uint8, 1 inside clinically significant lesions.
        lesion_index: ``[D, H, W]`` uint8, ``i`` inside lesion ``i`` (1-based, all lesions).
        significant: 1 if the study has a clinically significant lesion.
        max_pirads: study-level PI-RADS-like category 1-5 (1 without lesions).
        geometry: the grid geometry of this case.
        truth: the ground-truth dictionary (ground_truth.json content).
    """

    case_id: str
    images: np.ndarray
    availability: np.ndarray
    target: np.ndarray
    lesion_index: np.ndarray
    significant: int
    max_pirads: int
    geometry: GridGeometry
    truth: dict[str, Any] = field(default_factory=dict)


def significant_mask(lesion_index: np.ndarray, truth: dict[str, Any]) -> np.ndarray:
    """``[D, H, W]`` uint8 mask of the clinically significant lesions of ``truth`` in ``lesion_index``."""
    labels = [i + 1 for i, lesion in enumerate(truth.get("lesions", [])) if lesion.get("significant")]
    return np.isin(lesion_index, labels).astype(np.uint8)


def pirads_target(lesion_index: np.ndarray, truth: dict[str, Any]) -> np.ndarray:
    """``[D, H, W]`` uint8 PI-RADS-like category per voxel: the category of the lesion it lies in (mimics
    included), 1 outside lesions (the target of the score map, see ``training.train.score_loss``)."""
    lut = np.ones(256, dtype=np.uint8)
    for i, lesion in enumerate(truth.get("lesions", []), start=1):
        lut[i] = int(max(1, min(5, int(lesion.get("pirads", 1)))))
    return lut[lesion_index]


def study_labels(truth: dict[str, Any]) -> tuple[int, int]:
    """``(significant, max_pirads)`` of a ground-truth dict (max_pirads = 1 without lesions)."""
    lesions = truth.get("lesions", [])
    significant = int(truth.get("significant", any(bool(les.get("significant")) for les in lesions)))
    max_pirads = truth.get("max_pirads")
    if max_pirads is None:
        max_pirads = max((int(les.get("pirads", 1)) for les in lesions), default=1)
    return significant, int(max(1, min(5, int(max_pirads))))


def record_from_preprocessed(case_id: str, study: Any, label_image: Any, truth: dict[str, Any]) -> CaseRecord:
    """Build a :class:`CaseRecord` from a ``PreprocessedStudy`` and the lesion label image (T2W geometry)."""
    from preprocessing.grid import resample_label_to_grid

    images = np.asarray(study.tensor, dtype=np.float32)
    availability = np.asarray(study.availability, dtype=np.float32)
    if images.shape[0] != NUM_SEQUENCES or availability.shape != (NUM_SEQUENCES,):
        raise TrainingDataError(
            f"case {case_id}: preprocessing returned tensor {images.shape}, availability {availability.shape}"
        )
    lesion_index = np.asarray(resample_label_to_grid(label_image, study.geometry), dtype=np.uint8)
    significant, max_pirads = study_labels(truth)
    return CaseRecord(
        case_id=case_id,
        images=images,
        availability=availability,
        target=significant_mask(lesion_index, truth),
        lesion_index=lesion_index,
        significant=significant,
        max_pirads=max_pirads,
        geometry=study.geometry,
        truth=truth,
    )


def prepare_synthetic_case(seed: int, index: int, grid: GridSpec = DEFAULT_GRID) -> CaseRecord:
    """Synthesize study ``index`` of ``seed`` (DICOM datasets in memory) and run the serving preprocessing on it
    (onto ``grid``: the model grid of the networks being trained)."""
    from preprocessing.pipeline import PreprocessSettings, preprocess_study
    from synth.generator import synthesize_study

    study = synthesize_study(seed, index)
    pre = preprocess_study(study.series, PreprocessSettings(grid=grid))
    return record_from_preprocessed(f"seed{seed}_{index:04d}", pre, study.label_image, study.truth)


def prepare_case_dir(case_dir: Path, grid: GridSpec = DEFAULT_GRID) -> CaseRecord:
    """Preprocess a case folder written by ``mpmri synth`` (``dicom/``, ``ground_truth.json``, ``lesions.nii.gz``)
    onto ``grid`` (the model grid of the networks that will read it: ``nets.grid``)."""
    import SimpleITK as sitk

    from preprocessing.pipeline import PreprocessSettings, preprocess_study

    case_dir = Path(case_dir)
    truth_path, label_path = case_dir / "ground_truth.json", case_dir / "lesions.nii.gz"
    for path in (case_dir / "dicom", truth_path, label_path):
        if not path.exists():
            raise TrainingDataError(f"case folder {case_dir} lacks {path.name}")
    truth = json.loads(truth_path.read_text())
    pre = preprocess_study(case_dir / "dicom", PreprocessSettings(grid=grid))
    return record_from_preprocessed(case_dir.name, pre, sitk.ReadImage(str(label_path)), truth)


def save_case(path: Path, record: CaseRecord) -> None:
    """Write ``record`` as one uncompressed ``.npz`` (atomically).

    Uncompressed: at the realistic grid zlib saved 30 % of a case's 22 MB and took 1.0 s, as long as synthesizing
    and preprocessing the case itself (2-core VM); files written compressed by earlier versions still load.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        images=record.images,
        availability=record.availability,
        target=record.target,
        lesion_index=record.lesion_index,
        significant=np.int64(record.significant),
        max_pirads=np.int64(record.max_pirads),
        meta=np.asarray(
            json.dumps(
                {
                    "case_id": record.case_id,
                    "geometry": record.geometry.to_dict(),
                    "truth": record.truth,
                    "contract_version": CONTRACT_VERSION,
                    "cache_format_version": CACHE_FORMAT_VERSION,
                    "generator_version": GENERATOR_VERSION,
                    "preprocessing_version": PREPROCESSING_VERSION,
                    "sequences": list(SEQUENCES),
                }
            )
        ),
    )
    tmp.replace(path)


def load_case(path: Path) -> CaseRecord:
    """Read a case written by :func:`save_case`."""
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("contract_version") != CONTRACT_VERSION or meta.get("sequences") != list(SEQUENCES):
                raise TrainingDataError(f"cached case {path} was built for another contract; delete the cache")
            if meta.get("generator_version") != GENERATOR_VERSION:
                raise TrainingDataError(
                    f"cached case {path} was synthesized by generator version {meta.get('generator_version')!r},"
                    f" not {GENERATOR_VERSION!r}; delete the cache"
                )
            if meta.get("preprocessing_version") != PREPROCESSING_VERSION:
                raise TrainingDataError(
                    f"cached case {path} was preprocessed by version {meta.get('preprocessing_version')!r} of the"
                    f" pipeline, not {PREPROCESSING_VERSION!r}; delete the cache"
                )
            return CaseRecord(
                case_id=meta["case_id"],
                images=data["images"].astype(np.float32, copy=False),
                availability=data["availability"].astype(np.float32, copy=False),
                target=data["target"].astype(np.uint8, copy=False),
                lesion_index=data["lesion_index"].astype(np.uint8, copy=False),
                significant=int(data["significant"]),
                max_pirads=int(data["max_pirads"]),
                geometry=GridGeometry.from_dict(meta["geometry"]),
                truth=meta["truth"],
            )
    except (OSError, KeyError, ValueError) as err:
        raise TrainingDataError(f"cannot read cached case {path}: {err}") from err


def load_cases(paths: Sequence[Path], workers: int = 1) -> list[CaseRecord]:
    """:func:`load_case` of every path, in order (``workers`` threads: file reads release the GIL)."""
    if workers <= 1 or len(paths) < 2:
        return [load_case(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load_case, paths))


def case_cache_path(cache_dir: Path, seed: int, index: int, grid: GridSpec = DEFAULT_GRID) -> Path:
    """``<cache_dir>/gen<GENERATOR_VERSION>/prep<PREPROCESSING_VERSION>/seed<seed>/case_<index:04d>.npz``
    (another grid than the default: ``.../prep<v>/grid<D>x<H>x<W>_<d>x<h>x<w>mm/seed<seed>/...``)."""
    root = Path(cache_dir) / f"gen{GENERATOR_VERSION}" / f"prep{PREPROCESSING_VERSION}"
    if grid != DEFAULT_GRID:
        size = "x".join(str(n) for n in grid.size_dhw)
        spacing = "x".join(f"{v:g}" for v in grid.spacing_mm_dhw)
        root = root / f"grid{size}_{spacing}mm"
    return root / f"seed{seed}" / f"case_{index:04d}.npz"


def build_cache(
    cache_dir: Path,
    seed: int,
    indices: Sequence[int],
    progress: bool = True,
    grid: GridSpec = DEFAULT_GRID,
    workers: int = 1,
) -> list[Path]:
    """Make sure every case ``index`` of ``seed`` is cached under ``cache_dir``; returns the npz paths.

    Existing files are reused (the cache key is generator version + seed + index; :func:`load_case` refuses a
    case of another contract or generator version). ``workers > 1`` builds the missing cases in that many
    processes (``spawn``: safe after torch has started its threads); every case is a pure function of
    ``(seed, index, grid)``, so the files do not depend on ``workers``.
    """
    paths = [case_cache_path(cache_dir, seed, i, grid) for i in indices]
    missing = missing_cases(cache_dir, seed, indices, grid)
    bar = tqdm(total=len(missing), desc=f"cache seed {seed}", disable=not progress or not missing, mininterval=5)
    if workers <= 1 or len(missing) < 2:
        for index, path in missing:
            _cache_case(seed, index, grid, path)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            jobs = [(seed, index, grid, path) for index, path in missing]
            for _ in pool.map(_cache_case, *zip(*jobs, strict=True)):
                bar.update()
    bar.close()
    return paths


def missing_cases(
    cache_dir: Path, seed: int, indices: Sequence[int], grid: GridSpec = DEFAULT_GRID
) -> list[tuple[int, Path]]:
    """``(index, path)`` of the cases of ``indices`` not yet in the cache (what :func:`build_cache` builds)."""
    paths = (case_cache_path(cache_dir, seed, i, grid) for i in indices)
    return [(i, p) for i, p in zip(indices, paths, strict=True) if not p.exists()]


#: whether this process has checked its compiled preprocessing kernels (once per process, pool workers included)
_kernels_checked = False


def _cache_case(seed: int, index: int, grid: GridSpec, path: Path) -> None:
    """Synthesize, preprocess and save one case (a top-level function: picklable for the process pool).

    The process's first case checks the compiled preprocessing kernels first
    (:func:`preprocessing.kernel_check.check_kernels`): a cache of miscompiled tensors would train a model that
    no correct service serves.
    """
    global _kernels_checked
    if not _kernels_checked:
        from preprocessing.kernel_check import check_kernels

        check_kernels()
        _kernels_checked = True
    save_case(path, prepare_synthetic_case(seed, index, grid))


# --------------------------------------------------------------------------------------------------
# Augmentation + torch dataset
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentSettings:
    """Training-time augmentation (deterministic per ``(seed, epoch, item)``).

    Attributes:
        flip_lr_probability: mirror left-right (the grid axis closest to patient L).
        intensity_scale: per present channel, multiply by ``1 + U(-s, s)``.
        intensity_shift: per present channel, add ``U(-s, s)``.
        sequence_dropout_probability: per optional sequence (ADC, DWI), drop it (channel filled with the
            contract's missing value, availability 0); T2W is never dropped.
    """

    flip_lr_probability: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    sequence_dropout_probability: float = 0.2


def lr_array_axis(geometry: GridGeometry) -> int:
    """Array axis (0=D, 1=H, 2=W) whose direction is closest to the patient L-R (LPS x) axis."""
    itk_axis = int(np.argmax(np.abs(geometry.direction_matrix[0, :])))  # column c = LPS vector of ITK axis c
    return 2 - itk_axis


def remove_sequences(
    images: np.ndarray, availability: np.ndarray, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images [S, D, H, W] float32, availability [S] float32)`` with the sequences absent from ``availability``
    (or not kept by the mask ``keep [S]``, 1 = keep) set to the contract's missing-channel value, as preprocessing
    fills a sequence a study lacks: a study seen without some of its sequences (the ablation, the lesion scorer's
    missing-sequence passes)."""
    present = np.asarray(availability, dtype=np.float32)
    if keep is not None:
        present = np.minimum(present, np.asarray(keep, dtype=np.float32))
    images = np.where(present[:, None, None, None] > 0.5, images, np.float32(MISSING_CHANNEL_FILL_VALUE))
    return images.astype(np.float32, copy=False), present


def augment_case(
    images: np.ndarray,
    availability: np.ndarray,
    target: np.ndarray,
    geometry: GridGeometry,
    settings: AugmentSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augmented copies of ``(images [S,D,H,W], availability [S], target [..., D,H,W])`` (label maps may be stacked)."""
    images, availability, target = images.copy(), availability.copy(), target.copy()
    if rng.random() < settings.flip_lr_probability:
        axis = lr_array_axis(geometry)
        images = np.flip(images, axis=axis + 1).copy()
        target = np.flip(target, axis=target.ndim - 3 + axis).copy()
    for s, name in enumerate(SEQUENCES):
        if availability[s] < 0.5:
            continue
        if name not in REQUIRED_SEQUENCES and rng.random() < settings.sequence_dropout_probability:
            images[s] = MISSING_CHANNEL_FILL_VALUE
            availability[s] = 0.0
            continue
        scale = 1.0 + rng.uniform(-settings.intensity_scale, settings.intensity_scale)
        shift = rng.uniform(-settings.intensity_shift, settings.intensity_shift)
        images[s] = images[s] * scale + shift
    return images, availability, target


class CaseDataset(torch.utils.data.Dataset):
    """In-memory cases as training tensors; call :meth:`set_epoch` before each epoch for fresh augmentation.

    Items: ``images [S,D,H,W]``, ``availability [S]``, ``target [1,D,H,W]`` float32, ``pirads_target [D,H,W]``
    int64 (category 1-5 per voxel, :func:`pirads_target`), ``lesion_index [D,H,W]`` int64 (0 outside lesions,
    ``i`` inside lesion ``i``), ``significant`` float32, ``pirads_class`` int64 (0-4 = study category 1-5).
    """

    def __init__(self, records: Sequence[CaseRecord], augment: AugmentSettings | None = None, seed: int = 0) -> None:
        self.records = list(records)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.records[i]
        labels = np.stack([rec.target, pirads_target(rec.lesion_index, rec.truth), rec.lesion_index])
        images, availability = rec.images, rec.availability
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            images, availability, labels = augment_case(images, availability, labels, rec.geometry, self.augment, rng)
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
            "availability": torch.from_numpy(np.ascontiguousarray(availability, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(labels[0], dtype=np.float32))[None],
            "pirads_target": torch.from_numpy(np.ascontiguousarray(labels[1], dtype=np.int64)),
            "lesion_index": torch.from_numpy(np.ascontiguousarray(labels[2], dtype=np.int64)),
            "significant": torch.tensor(float(rec.significant)),
            "pirads_class": torch.tensor(rec.max_pirads - 1, dtype=torch.int64),
        }
