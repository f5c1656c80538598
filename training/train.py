"""Two-phase training: (1) localization + fusion, (2) classification with (1) frozen, (3) joint fine-tuning.

Losses (MONAI):

* localization: ``DiceFocalLoss(sigmoid=True, batch=True)`` on the logits of every *present* sequence
  against the csPCa target, plus ``DiceLoss(batch=True) + BCE`` on the fused map (this trains the
  fusion weights);
* classification (the score map): an ordinal cumulative-link loss per voxel (categories of the lesions,
  mimics included) and per study (the highest score against the study category), see :func:`score_loss`.

After the last epoch the category thresholds and the csPCa logit are calibrated on the validation split, plus
``calibration_cases`` further studies that only calibration sees (:func:`training.calibration.calibrate`); the
calibration is part of the classification network's state, so it
travels with the checkpoint and the ONNX model and is applied identically by evaluation, the demo and the
service.

Determinism: everything is seeded from ``TrainConfig.seed``; augmentation and dropout are re-seeded
at every epoch from ``(seed, epoch)``, so a run resumed from ``last.pt`` continues exactly as an
uninterrupted run would. Per epoch the run folder gets ``history.csv`` and ``curves.png`` and
``last.pt`` (weights + optimizer state); the end result is ``final.pt`` (weights + metadata only).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss, DiceLoss
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from contract import NAMED_GRIDS, pirads_category
from contract.errors import MpmriError
from networks.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from networks.models import PROFILES, Classification, MpmriNetworks, build_networks_from_profile
from preprocessing import numba_target
from training.calibration import calibrate
from training.data import AugmentSettings, CaseDataset, CaseRecord, build_cache, load_cases, missing_cases
from training.lesion_scoring import candidate_table, fit_lesion_scorer, recalibrate_scorer

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("localization", "classification", "joint")
HISTORY_FIELDS: tuple[str, ...] = (
    "global_epoch",
    "phase",
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_dice",
    "val_auroc",
    "val_pirads_accuracy",
    "seconds",
)


class TrainingError(MpmriError):
    """Training cannot start or continue (bad settings, incompatible resume file)."""


@dataclass
class TrainConfig:
    """Settings of one training run (recorded in the checkpoint metadata).

    Attributes:
        profile: network profile (``networks.models.PROFILES``).
        grid: model grid by name (``contract.NAMED_GRIDS``: ``default`` 16x64x64 at 3x1.5x1.5 mm, ``fine``
            16x96x96 at 3x1x1 mm, ``realistic`` 24x256x256 at 3x0.5x0.5 mm); the data are preprocessed onto it and
            the checkpoint records it.
        localization_weights: override of the profile's ``localization_weights`` (``"shared"`` or
            ``"per_sequence"``; for the ablation in docs/networks.md). The checkpoint records the result.
        data_seed: synthetic data seed; cases ``0..cases-1`` of this seed are used.
        cases: number of synthetic cases in total (training + validation).
        val_cases: the last ``val_cases`` of them are held out for per-epoch validation.
        calibration_cases: further cases ``cases .. cases + calibration_cases - 1`` of ``data_seed``, used only to
            calibrate (category thresholds and Platt scaling, together with the validation split): neither
            trained on nor used for model selection. 0 = calibrate on the validation split alone.
        scorer_cases: ``None``: no second-stage lesion scorer. ``N >= 0``: after the calibration, fit the lesion
            scorer (:mod:`training.lesion_scoring`) on the validation split, the calibration-only cases and ``N``
            further cases of ``data_seed`` that only the scorer sees (``cases + calibration_cases ..``).
        recalibration_cases: with a lesion scorer, further cases after the scorer-only ones that only the
            recalibration sees: the study-level Platt map of the scorer's log-odds fitted there is folded into the
            scorer (:func:`training.lesion_scoring.recalibrate_scorer`). 0: none (releases 7-8).
        cache_dir: npz cache of preprocessed cases.
        run_dir: run folder (history.csv, curves.png, last.pt, final.pt).
        checkpoint_out: optional extra copy of the final checkpoint (e.g. checkpoints/cpu_default.pt).
        epochs: epochs per phase ``{"localization", "classification", "joint"}``.
        batch_size: studies per step.
        lr: peak learning rate of phases 1 and 2 (AdamW, cosine decay within a phase).
        lr_joint: peak learning rate of the joint fine-tuning phase.
        weight_decay: AdamW weight decay.
        seed: seed of initialisation, shuffling, augmentation and dropout.
        threads: ``torch.set_num_threads`` (and the processes that build the cache).
        device: where the networks train: ``"cpu"`` (the shipped CPU recipe) or ``"cuda"`` (the GPU profile);
            the checkpoint's weights are stored on the CPU either way.
        loader_workers: processes that read and augment training batches (``DataLoader(num_workers=...)``);
            0 = in the training process. Augmentation is seeded per ``(seed, epoch, case)``, so the batches do
            not depend on it. At the realistic grid one case is 22 MB, and a GPU step outruns one process.
        fused_loss_trains_localization: whether the fused-map terms of the localization loss (Dice + BCE) also
            train the localization through the fusion (``True``, releases 1-5), or only the fusion (``False``: the
            sequence maps enter those terms detached, so each map is trained by its own sequence's loss alone and
            the fusion cannot push a map it weighs little towards 0). The classification loss of the joint phase
            trains everything either way.
        map_dropout: probability that a training study's fused map reaches the classification network as zeros
            (classification and joint phases; ``0``: never, releases 1-6), so that the network learns to score
            lesions from the images and does not merely copy the map (see :func:`drop_fused_map`).
        lesion_balanced_localization: add to the localization loss a per-lesion recall term: the binary
            cross-entropy of each present sequence's map inside each csPCa lesion, averaged per lesion, then over
            lesions (:func:`lesion_balanced_recall`), so that a 6 mm transition-zone cancer weighs as much as a 20 mm
            one (the batch Dice and the per-voxel focal term weigh lesions by their volume). ``False``: releases 1-8.
        lesion_shell_voxels: with ``lesion_balanced_localization``, also a per-lesion term against 0 in a shell of
            this many voxels around each csPCa lesion (0: none).
        max_steps_per_epoch: cap on steps per epoch (smoke tests); ``None`` = full epochs.
        stop_after_epochs: stop this invocation after so many epochs (the run continues with
            ``--resume run_dir/last.pt``); ``None`` = run to the end.
        augment: augmentation settings.
    """

    profile: str = "cpu"
    grid: str = "default"
    localization_weights: str | None = None
    data_seed: int = 1
    cases: int = 200
    val_cases: int = 20
    calibration_cases: int = 0
    scorer_cases: int | None = None
    recalibration_cases: int = 0
    cache_dir: Path = Path(".cache/train")
    run_dir: Path = Path("build/runs/cpu_default")
    checkpoint_out: Path | None = None
    epochs: dict[str, int] = field(default_factory=lambda: {"localization": 30, "classification": 8, "joint": 6})
    batch_size: int = 4
    lr: float = 2e-3
    lr_joint: float = 3e-4
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    loader_workers: int = 0
    fused_loss_trains_localization: bool = True
    map_dropout: float = 0.0
    lesion_balanced_localization: bool = False
    lesion_shell_voxels: int = 0
    max_steps_per_epoch: int | None = None
    stop_after_epochs: int | None = None
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("cache_dir", "run_dir", "checkpoint_out"):
            d[key] = None if d[key] is None else str(d[key])
        return d


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
class LocalizationLoss(nn.Module):
    """Per-sequence DiceFocal on present sequences + Dice/BCE on the fused map (+ optionally
    :func:`lesion_balanced_recall` of the sequence maps)."""

    def __init__(self, lesion_balanced: bool = False, shell_voxels: int = 0) -> None:
        super().__init__()
        self.lesion_balanced = lesion_balanced
        self.shell_voxels = shell_voxels
        self.per_sequence = DiceFocalLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.fused_dice = DiceLoss(sigmoid=False, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(
        self,
        seq_logits: torch.Tensor,
        fused_map: torch.Tensor,
        target: torch.Tensor,
        availability: torch.Tensor,
        lesion_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        present = availability > 0.5  # [B, S]
        logits = seq_logits[present].unsqueeze(1)  # [N, 1, D, H, W]
        targets = target.expand_as(seq_logits)[present].unsqueeze(1)
        fused = fused_map.float().clamp(1e-6, 1 - 1e-6)
        # the terms in this order: autograd accumulates gradients in creation order, and the shipped checkpoint is
        # reproduced bit for bit only with the original order
        loss = self.per_sequence(logits, targets) + self.fused_dice(fused, target)
        with torch.autocast(fused.device.type, enabled=False):  # BCE on probabilities: fp32 (unsafe under autocast)
            loss = loss + F.binary_cross_entropy(fused, target.float())
        if self.lesion_balanced:
            if lesion_index is None:
                raise TrainingError("the lesion-balanced localization loss needs the batch's lesion_index")
            loss = loss + lesion_balanced_recall(seq_logits, target, availability, lesion_index, self.shell_voxels)
        return loss


def lesion_balanced_recall(
    seq_logits: torch.Tensor,
    target: torch.Tensor,
    availability: torch.Tensor,
    lesion_index: torch.Tensor,
    shell_voxels: int = 0,
) -> torch.Tensor:
    """Binary cross-entropy of the present sequences' maps against 1 inside the csPCa lesions, each lesion weighing
    the same (0 for a batch without one); with ``shell_voxels`` > 0 also against 0 in each lesion's shell (the
    voxels within that many voxels of it, 26-connected, outside every csPCa lesion), again per lesion: a blob loss
    that asks each lesion, whatever its volume, to be answered *and* delimited (two lesions side by side must
    not merge into one blob).

    Args:
        seq_logits: ``[B, S, D, H, W]`` the localization logits.
        target: ``[B, 1, D, H, W]`` the csPCa lesion mask.
        availability: ``[B, S]`` 1 where the sequence is present (absent ones do not count).
        lesion_index: ``[B, D, H, W]`` int, lesion ``i`` of its study (0 outside lesions).
        shell_voxels: the shell's width (0: no shell term).
    """
    inside = target[:, 0] > 0.5
    if not bool(inside.any()):
        return seq_logits.sum() * 0.0
    present = (availability > 0.5).to(torch.float32)[:, :, None, None, None]
    with torch.autocast(seq_logits.device.type, enabled=False):
        logits = seq_logits.float()
        ones = torch.ones_like(logits)
        bce = F.binary_cross_entropy_with_logits(logits, ones, reduction="none")
        per_voxel = (bce * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)  # [B, D, H, W]
        loss = per_lesion_mean(per_voxel, lesion_index.long(), inside)
        if shell_voxels > 0:
            labels = (lesion_index.long() * inside).to(torch.float32).unsqueeze(1)  # csPCa lesions only
            grown = F.max_pool3d(labels, kernel_size=2 * shell_voxels + 1, stride=1, padding=shell_voxels)[:, 0]
            shell = (grown > 0) & ~inside  # where two shells meet, the higher lesion number takes the voxel
            if bool(shell.any()):
                outside = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
                per_voxel = (outside * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)
                loss = loss + per_lesion_mean(per_voxel, grown.long(), shell)
    return loss


def score_loss(classification: Classification, score: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Ordinal (cumulative-link) loss of the score map, per voxel and per study.

    * voxel term: binary cross-entropy of ``P(>= k)`` for ``k = 2..5`` against the voxel's PI-RADS-like category
      (``pirads_target``: the category of the lesion it lies in, 1 outside lesions, mimics included). It is the
      mean over the voxels outside lesions plus the mean over *lesions* of each lesion's mean (``lesion_index``):
      every lesion counts the same whatever its volume, so a 6 mm transition-zone cancer weighs as much as a
      20 mm one (a mean over lesion voxels let the large lesions decide);
    * study term: the same at the study's highest score against the study category (``max_pirads``): this is
      what the study probability and category are read from.
    """
    categories = torch.arange(2, 6, device=score.device)
    target = batch["pirads_target"]  # [B, D, H, W] int64, 1..5
    cumulative = classification.cumulative_logits(score[:, 0])  # [B, D, H, W, K]
    voxel_bce = F.binary_cross_entropy_with_logits(
        cumulative, (target.unsqueeze(-1) >= categories).to(score.dtype), reduction="none"
    ).mean(dim=-1)
    in_lesion = target > 1
    voxel = voxel_bce[~in_lesion].mean()
    if bool(in_lesion.any()):
        voxel = voxel + per_lesion_mean(voxel_bce, batch["lesion_index"], in_lesion)
    study_logits = classification.cumulative_logits(score.amax(dim=(1, 2, 3, 4)))  # [B, K]
    study_target = (batch["pirads_class"].unsqueeze(-1) + 1 >= categories).to(score.dtype)
    study = F.binary_cross_entropy_with_logits(study_logits, study_target)
    return voxel + study


def per_lesion_mean(values: torch.Tensor, lesion_index: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean over lesions of the mean of ``values`` over each lesion's voxels.

    ``values``, ``lesion_index`` (int, lesion ``i`` of its study, 0 outside) and ``inside`` (bool, the voxels to
    use) are ``[B, D, H, W]``; a lesion is identified by ``(study in batch, lesion_index)``. Returns a scalar.
    """
    study = torch.arange(values.shape[0], device=values.device).view(-1, 1, 1, 1).expand_as(lesion_index)
    key = (study * 256 + lesion_index)[inside]
    sums = torch.zeros(values.shape[0] * 256, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, key, values[inside])
    counts = torch.bincount(key, minlength=sums.numel()).to(values.dtype)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def drop_fused_map(fused: torch.Tensor, probability: float) -> torch.Tensor:
    """``fused [B, 1, D, H, W]`` with each study's map set to 0 with ``probability`` (training only).

    The classification network reads the images and the fused map. Trained on the localization's maps of its own
    training studies, which are cleaner than on new ones, it learns to copy the map (scores follow the map, not the
    images) and cannot veto a mimic the map fires on. A study without its map must be scored from the images.
    """
    if probability <= 0.0:
        return fused
    keep = torch.rand(fused.shape[0], device=fused.device) >= probability
    return fused * keep.to(fused.dtype).view(-1, *([1] * (fused.dim() - 1)))


def _forward(
    nets: MpmriNetworks,
    batch: dict[str, torch.Tensor],
    phase: str,
    loc_loss: LocalizationLoss,
    fused_loss_trains_localization: bool = True,
    map_dropout: float = 0.0,
) -> torch.Tensor:
    images, availability = batch["images"], batch["availability"]
    if phase == "classification":
        with torch.no_grad():
            fused = nets.fusion(nets.localization(images), availability, images)
        fused = drop_fused_map(fused, map_dropout)
        return score_loss(nets.classification, nets.classification.score(images, fused), batch)
    seq_logits = nets.localization.forward_logits(images)
    sequence_maps = torch.sigmoid(seq_logits)
    if fused_loss_trains_localization:
        fused = nets.fusion(sequence_maps, availability, images)
        loss = loc_loss(seq_logits, fused, batch["target"], availability, batch.get("lesion_index"))
    else:  # the fused-map terms train the fusion only; the joint phase's classification reads the attached map
        fused_detached = nets.fusion(sequence_maps.detach(), availability, images)
        loss = loc_loss(seq_logits, fused_detached, batch["target"], availability, batch.get("lesion_index"))
        if phase == "joint":
            fused = nets.fusion(sequence_maps, availability, images)
    if phase == "joint":
        fused = drop_fused_map(fused, map_dropout)
        loss = loss + score_loss(nets.classification, nets.classification.score(images, fused), batch)
    return loss


def trainable_parameters(nets: MpmriNetworks, phase: str) -> list[nn.Parameter]:
    """Parameters optimized in ``phase``; all others get ``requires_grad=False``."""
    train_mods = {
        "localization": (nets.localization, nets.fusion),
        "classification": (nets.classification,),
        "joint": (nets.localization, nets.fusion, nets.classification),
    }[phase]
    for module in nets.modules().values():
        module.requires_grad_(any(module is m for m in train_mods))
    return [p for m in train_mods for p in m.parameters()]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on ``device`` (asynchronous from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def validate(nets: MpmriNetworks, records: Sequence[CaseRecord], batch_size: int) -> dict[str, float]:
    """Loss (all terms), fused-map Dice at 0.5, csPCa AUROC and PI-RADS accuracy on ``records`` (on the networks'
    device)."""
    if not records:
        return {"val_loss": math.nan, "val_dice": math.nan, "val_auroc": math.nan, "val_pirads_accuracy": math.nan}
    nets.eval()
    device = nets.device
    loc_loss = LocalizationLoss().to(device)
    loader = torch.utils.data.DataLoader(CaseDataset(records), batch_size=batch_size, shuffle=False)
    losses, probs, labels, correct = [], [], [], 0
    inter = denom = 0.0
    for batch in loader:
        batch = to_device(batch, device)
        out = nets(batch["images"], batch["availability"])
        seq_logits = nets.localization.forward_logits(batch["images"])
        loss = loc_loss(seq_logits, out["fused_map"], batch["target"], batch["availability"])
        loss = loss + score_loss(nets.classification, out["score_map"], batch)
        cspca = out["cspca_probability"][:, 0]
        losses.append(float(loss) * len(cspca))
        pred = (out["fused_map"] > 0.5).float()
        inter += float((pred * batch["target"]).sum())
        denom += float(pred.sum() + batch["target"].sum())
        probs += cspca.tolist()
        labels += batch["significant"].tolist()
        study_scores = out["score_map"].amax(dim=(1, 2, 3, 4)).tolist()
        predicted = torch.tensor([pirads_category(v) - 1 for v in study_scores])
        correct += int((predicted == batch["pirads_class"].cpu()).sum())
    auroc = float(roc_auc_score(labels, probs)) if 0 < sum(labels) < len(labels) else math.nan
    return {
        "val_loss": sum(losses) / len(records),
        "val_dice": 2 * inter / denom if denom > 0 else 1.0,
        "val_auroc": auroc,
        "val_pirads_accuracy": correct / len(records),
    }


# --------------------------------------------------------------------------------------------------
# Run folder outputs
# --------------------------------------------------------------------------------------------------
def write_history(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    with open(run_dir / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(HISTORY_FIELDS))
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k) for k in HISTORY_FIELDS})


def plot_history(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    x = [r["global_epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(x, [r["train_loss"] for r in history], label="train loss")
    axes[0].plot(x, [r["val_loss"] for r in history], label="val loss (all terms)")
    axes[0].set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[0].legend()
    for key in ("val_dice", "val_auroc", "val_pirads_accuracy"):
        axes[1].plot(x, [r[key] for r in history], label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylim(0, 1.02)
    axes[1].legend()
    boundaries = [
        r["global_epoch"] for prev, r in zip(history, history[1:], strict=False) if r["phase"] != prev["phase"]
    ]
    for ax in axes:
        for b in boundaries:
            ax.axvline(b - 0.5, color="grey", linestyle=":")
    fig.suptitle(f"training curves ({run_dir.name}); dotted: phase boundaries")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def build_networks_for(config: TrainConfig) -> MpmriNetworks:
    """Fresh networks of ``config.profile`` (with the ``localization_weights`` override applied)."""
    if config.profile not in PROFILES:
        raise TrainingError(f"unknown network profile {config.profile!r}; choose from {sorted(PROFILES)}")
    if config.grid not in NAMED_GRIDS:
        raise TrainingError(f"unknown grid {config.grid!r}; choose from {sorted(NAMED_GRIDS)}")
    profile = PROFILES[config.profile]
    if config.localization_weights is not None:
        profile = dataclasses.replace(profile, localization_weights=config.localization_weights)
    return build_networks_from_profile(profile, NAMED_GRIDS[config.grid])


def _schedule(config: TrainConfig) -> list[tuple[str, int]]:
    """``(phase, epoch_in_phase)`` for every global epoch."""
    return [(phase, e) for phase in PHASES for e in range(config.epochs.get(phase, 0))]


def _lr(config: TrainConfig, phase: str, epoch: int) -> float:
    peak = config.lr_joint if phase == "joint" else config.lr
    total = max(1, config.epochs[phase])
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / total)))


def _scorer_end(config: TrainConfig) -> int:
    """One past the last scorer-only case index."""
    return config.cases + config.calibration_cases + (config.scorer_cases or 0)


def _case_indices(config: TrainConfig) -> range:
    """Every case index of ``config.data_seed`` the run reads (training, validation, calibration-only, scorer-only,
    recalibration-only)."""
    return range(_scorer_end(config) + config.recalibration_cases)


class RecordSplits(NamedTuple):
    """The cached records of a run, by role (case indices in this order, contiguous)."""

    training: list[CaseRecord]
    validation: list[CaseRecord]
    calibration: list[CaseRecord]
    scorer: list[CaseRecord]
    recalibration: list[CaseRecord]


def load_records(config: TrainConfig, progress: bool = True) -> RecordSplits:
    """Cached records of ``config`` by role (building the cache where needed)."""
    if config.cases <= config.val_cases:
        raise TrainingError(f"cases ({config.cases}) must exceed val_cases ({config.val_cases})")
    if config.calibration_cases < 0:
        raise TrainingError(f"calibration_cases must be >= 0, not {config.calibration_cases}")
    if config.scorer_cases is not None and config.scorer_cases < 0:
        raise TrainingError(f"scorer_cases must be >= 0 (or None: no lesion scorer), not {config.scorer_cases}")
    if config.recalibration_cases < 0:
        raise TrainingError(f"recalibration_cases must be >= 0, not {config.recalibration_cases}")
    if config.recalibration_cases and config.scorer_cases is None:
        raise TrainingError("recalibration_cases recalibrate the lesion scorer: they need scorer_cases")
    grid = NAMED_GRIDS[config.grid]
    paths = build_cache(
        config.cache_dir, config.data_seed, _case_indices(config), progress=progress, grid=grid, workers=config.threads
    )
    records = load_cases(paths, workers=config.threads)
    split = config.cases - config.val_cases
    calibration_end = config.cases + config.calibration_cases
    scorer_end = _scorer_end(config)
    return RecordSplits(
        records[:split],
        records[split : config.cases],
        records[config.cases : calibration_end],
        records[calibration_end:scorer_end],
        records[scorer_end:],
    )


def _batches(dataset: CaseDataset, config: TrainConfig, global_epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(config.seed * 100_003 + global_epoch)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        generator=gen,
        drop_last=True,
        num_workers=config.loader_workers,
        pin_memory=config.device != "cpu",
    )
    for step, batch in enumerate(loader):
        if config.max_steps_per_epoch is not None and step >= config.max_steps_per_epoch:
            return
        yield batch


def training_device(config: TrainConfig) -> torch.device:
    """``config.device`` as a torch device; a clear error where it is not available on this machine."""
    try:
        device = torch.device(config.device)
    except RuntimeError as err:
        raise TrainingError(f"unknown training device {config.device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"training device {config.device!r} asked for, but torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"training device {config.device!r}: only cpu and cuda are supported")
    if config.loader_workers < 0:
        raise TrainingError(f"loader_workers must be >= 0, not {config.loader_workers}")
    return device


def train(config: TrainConfig, resume: Path | None = None, progress: bool = True) -> Path:
    """Run (or resume) training; returns the final checkpoint ``run_dir/final.pt`` (``last.pt`` when stopped early)."""
    if not 0.0 <= config.map_dropout <= 1.0:
        raise TrainingError(f"map_dropout is a probability (0 to 1), not {config.map_dropout}")
    device = training_device(config)
    torch.set_num_threads(config.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest convolutions
    started, load_start = time.monotonic(), os.getloadavg()
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    nets = build_networks_for(config)  # first: a bad profile fails before any data work
    schedule = _schedule(config)
    if not schedule:
        raise TrainingError("no epochs to run (all --epochs-* are 0)")
    to_build = len(missing_cases(config.cache_dir, config.data_seed, _case_indices(config), NAMED_GRIDS[config.grid]))
    cache_started = time.monotonic()
    train_records, val_records, calibration_records, scorer_records, recalibration_records = load_records(
        config, progress=progress
    )
    cache_seconds = time.monotonic() - cache_started
    if len(train_records) < config.batch_size:
        raise TrainingError(f"{len(train_records)} training cases are fewer than one batch ({config.batch_size})")
    history: list[dict[str, Any]] = []
    start = 0
    optimizer_state: dict[str, Any] | None = None
    if resume is not None:
        state = load_training_state(resume)
        if state is None:
            raise TrainingError(f"{resume} holds no training state (use a run's last.pt to resume)")
        nets, _ = load_checkpoint(resume)
        if nets.profile.name != config.profile:
            raise TrainingError(f"resume file has profile {nets.profile.name!r}, run asks for {config.profile!r}")
        start, history = int(state["next_global_epoch"]), list(state["history"])
        optimizer_state = (
            state.get("optimizer") if state.get("phase") == schedule[min(start, len(schedule) - 1)][0] else None
        )
        log.info("resuming %s at global epoch %d", resume, start)

    # on the CPU, channels-last 3D memory layout: same results, about 2x faster convolution gradients (oneDNN)
    channels_last = device.type == "cpu"
    nets.to(device)
    if channels_last:
        for module in nets.modules().values():
            module.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    dataset = CaseDataset(train_records, augment=config.augment, seed=config.seed)
    loc_loss = LocalizationLoss(config.lesion_balanced_localization, config.lesion_shell_voxels).to(device)
    optimizer: torch.optim.Optimizer | None = None
    current_phase = None
    end = len(schedule) if config.stop_after_epochs is None else min(len(schedule), start + config.stop_after_epochs)
    for global_epoch in range(start, end):
        phase, epoch = schedule[global_epoch]
        if phase != current_phase:
            params = trainable_parameters(nets, phase)
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            if optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
                optimizer_state = None
            current_phase = phase
        assert optimizer is not None
        lr = _lr(config, phase, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(config.seed * 1_000_003 + global_epoch)  # dropout etc.: same on resume
        dataset.set_epoch(global_epoch)
        nets.train()
        t0 = time.monotonic()
        losses: list[float] = []
        bar = tqdm(
            _batches(dataset, config, global_epoch),
            total=min(len(dataset) // config.batch_size, config.max_steps_per_epoch or 10**9),
            desc=f"{phase} {epoch + 1}/{config.epochs[phase]}",
            disable=not progress,
            mininterval=10,
            leave=False,
        )
        for batch in bar:
            batch = to_device(batch, device)
            if channels_last:
                batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last_3d)
            loss = _forward(nets, batch, phase, loc_loss, config.fused_loss_trains_localization, config.map_dropout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 5.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        row: dict[str, Any] = {
            "global_epoch": global_epoch,
            "phase": phase,
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            **validate(nets, val_records, config.batch_size),
        }
        row["seconds"] = round(time.monotonic() - t0, 2)
        history.append(row)
        log.info(
            "epoch %d %s: train %.4f val %.4f dice %.3f auroc %.3f pirads %.3f (%.0fs)",
            global_epoch,
            phase,
            row["train_loss"],
            row["val_loss"],
            row["val_dice"],
            row["val_auroc"],
            row["val_pirads_accuracy"],
            row["seconds"],
        )
        write_history(run_dir, history)
        plot_history(run_dir, history)
        save_checkpoint(
            run_dir / "last.pt",
            nets,
            _metadata(config, history, len(train_records), len(val_records)),
            training_state={
                "next_global_epoch": global_epoch + 1,
                "phase": phase,
                "optimizer": optimizer.state_dict(),
                "history": history,
            },
        )

    if end < len(schedule):
        log.info("stopped after global epoch %d of %d; resume with %s", end - 1, len(schedule), run_dir / "last.pt")
        return run_dir / "last.pt"
    nets.eval()
    final = run_dir / "final.pt"
    meta = _metadata(config, history, len(train_records), len(val_records))
    meta["calibration"] = {
        **calibrate(nets, [*val_records, *calibration_records], config.batch_size),
        "data": _calibration_data(config, len(train_records)),
    }
    log.info("calibration: %s", meta["calibration"])
    scorer_seconds = None
    if config.scorer_cases is not None:
        scorer_started = time.monotonic()
        table = candidate_table(nets, [*val_records, *calibration_records, *scorer_records], missing_sequences=True)
        scorer = fit_lesion_scorer(table, fitted_on={"data": _scorer_data(config, len(train_records))})
        if recalibration_records:
            first = _scorer_end(config)
            scorer = recalibrate_scorer(
                nets,
                scorer,
                recalibration_records,
                f"seed {config.data_seed} cases {first}-{first + len(recalibration_records) - 1} (recalibration-only)",
            )
        meta["lesion_scoring"] = scorer.to_dict()
        scorer_seconds = round(time.monotonic() - scorer_started, 1)
        log.info("lesion scorer fitted in %.1f s", scorer_seconds)
    meta["training"]["invocation"] = {
        "wall_seconds": round(time.monotonic() - started, 1),
        "cache_cases_built": to_build,
        "cache_seconds": round(cache_seconds, 1),
        "lesion_scorer_seconds": scorer_seconds,
        "resumed": resume is not None,
        "load_average_1_5_15_start": [round(v, 2) for v in load_start],
        "load_average_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "numba_target": numba_target.compiled_target(),
        "threads": config.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    save_checkpoint(final, nets, meta)
    if config.checkpoint_out is not None:
        save_checkpoint(Path(config.checkpoint_out), nets, meta)
    return final


def cpu_model() -> str:
    """:func:`preprocessing.numba_target.cpu_description`: a run records where its tensors were preprocessed (a
    compiler bug was CPU-specific)."""
    return numba_target.cpu_description()


def _calibration_data(config: TrainConfig, n_train: int) -> str:
    """Which studies the calibration was fitted on (recorded in the checkpoint)."""
    text = f"validation split: seed {config.data_seed} cases {n_train}-{config.cases - 1}"
    if config.calibration_cases:
        last = config.cases + config.calibration_cases - 1
        text += f"; calibration-only: seed {config.data_seed} cases {config.cases}-{last}"
    return text


def _scorer_data(config: TrainConfig, n_train: int) -> str:
    """Which studies the lesion scorer was fitted on (recorded in the checkpoint)."""
    first, last = n_train, _scorer_end(config) - 1
    return f"seed {config.data_seed} cases {first}-{last} (validation, calibration-only and scorer-only cases)"


def _metadata(config: TrainConfig, history: Sequence[dict[str, Any]], n_train: int, n_val: int) -> dict[str, Any]:
    last = dict(history[-1]) if history else {}
    return {
        "training": {
            "config": config.to_dict(),
            "data": {
                "generator": "synth.generator.synthesize_study",
                "data_seed": config.data_seed,
                "cases": config.cases,
                "train_cases": n_train,
                "val_cases": n_val,
                "calibration_cases": config.calibration_cases,
                "scorer_cases": config.scorer_cases,
                "recalibration_cases": config.recalibration_cases,
                "case_indices": [0, _case_indices(config).stop - 1],
            },
            "epochs_done": len(history),
            "final_validation": {k: last.get(k) for k in ("val_loss", "val_dice", "val_auroc", "val_pirads_accuracy")},
            "seconds": round(sum(float(r.get("seconds", 0.0)) for r in history), 1),
        },
        "evaluation": {},
    }
