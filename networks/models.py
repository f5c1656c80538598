"""The three networks of the serving chain: localization -> map fusion -> classification.

All tensors follow the contract (:mod:`contract`): images ``[B, S, D, H, W]`` float32 in the
sequence order :data:`~contract.SEQUENCES`, availability ``[B, S]`` (1 = present, 0 = missing;
a missing channel holds :data:`~contract.MISSING_CHANNEL_FILL_VALUE`).

* :class:`Localization` runs one 3D U-Net (MONAI ``UNet``) over every sequence on its own and
  returns one lesion-likelihood map per sequence, ``[B, S, D, H, W]`` in ``[0, 1]``. Its weights are
  shared by the sequences; a one-hot *sequence embedding* (S constant input channels) tells the
  network which sequence it looks at (``localization_weights="shared"``, the default). The
  alternative, one U-Net per sequence (``"per_sequence"``), is kept for the ablation in
  ``docs/networks.md``.
* :class:`MapFusion` is a per-voxel weighted mean of the sequence maps over the *present* sequences
  only: a softmax of learned global logits plus a small gating network over the images and maps, renormalized
  over the available sequences, so a study without ADC/DWI still gets a map in ``[0, 1]`` built from T2W,
  and the fusion can weigh the sequences differently per zone.
* :class:`Classification` reads the images plus the fused map and regresses a continuous PI-RADS-like
  score per voxel (``score_map``), read as an ordinal model; its calibrated csPCa probability per voxel
  (``cspca_map``) scores the lesion candidates (the blobs of the fused map). The study results are derived from the
  maps: ``cspca_probability`` = max of ``cspca_map``, ``pirads_distribution`` at the highest score.

The grid is anisotropic (3 mm slices, 1.5 mm in-plane), so the first down-sampling step keeps the
slice axis (stride ``(1, 2, 2)``).

ONNX: every module exports with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``)
at :data:`ONNX_OPSET` with a dynamic batch axis; :func:`export_kwargs` returns the exact arguments
(names from :data:`contract.MODEL_IO`). The dynamo exporter is slower and was not needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn

from contract import (
    CLASSIFICATION_MODEL,
    CSPCA_MIN_PIRADS,
    DEFAULT_GRID,
    FUSION_MODEL,
    LOCALIZATION_MODEL,
    MODEL_IO,
    NUM_SEQUENCES,
    PIRADS_CATEGORIES,
    PIRADS_SCORE_CUTPOINTS,
    GridSpec,
    tensor_specs,
)

#: ONNX opset used by :func:`export_kwargs` (TorchScript exporter, ``dynamo=False``).
ONNX_OPSET: int = 17

Strides = tuple[tuple[int, int, int], ...]
#: smallest gap between two fitted category thresholds (score units): every category keeps a non-empty range
MIN_THRESHOLD_GAP: float = 0.1
#: initial value of the localization output bias (prior lesion probability sigmoid(-4) ~ 0.018)
LOGIT_PRIOR_BIAS: float = -4.0


@dataclass(frozen=True)
class NetworkProfile:
    """Sizes of the three networks (one definition, two profiles: see :data:`PROFILES`).

    Attributes:
        name: profile name recorded in checkpoints.
        localization_channels: U-Net feature channels per level.
        localization_strides: down-sampling strides ``(d, h, w)`` between levels (len = levels - 1).
        localization_res_units: residual units per U-Net block (0 = plain convolutions).
        localization_weights: ``"shared"`` (one U-Net + sequence embedding) or ``"per_sequence"``.
        classification_channels: feature channels per level of the classification (score) U-Net.
        classification_strides: its down-sampling strides (len = levels - 1).
        classification_res_units: residual units per block of that U-Net.
        dropout: dropout inside the classification U-Net.
    """

    name: str
    localization_channels: tuple[int, ...] = (8, 16, 32, 64)
    localization_strides: Strides = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    localization_res_units: int = 1
    localization_weights: str = "shared"
    classification_channels: tuple[int, ...] = (8, 16, 32, 64)
    classification_strides: Strides = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    classification_res_units: int = 1
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkProfile:
        kw = dict(d)
        for key in ("localization_channels", "classification_channels"):
            kw[key] = tuple(int(v) for v in kw[key])
        for key in ("localization_strides", "classification_strides"):
            kw[key] = tuple(tuple(int(v) for v in s) for s in kw[key])
        return cls(**kw)


#: "cpu": the default (whole chain well under 0.5 s per study on 2 CPU cores); "gpu": larger.
PROFILES: dict[str, NetworkProfile] = {
    "cpu": NetworkProfile(name="cpu"),
    "gpu": NetworkProfile(
        name="gpu",
        localization_channels=(16, 32, 64, 128, 256),
        localization_strides=((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
        localization_res_units=2,
        classification_channels=(16, 32, 64, 128),
        classification_res_units=2,
        dropout=0.2,
    ),
}


def _check_images(images: torch.Tensor, what: str) -> None:
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # shapes are fixed by the export inputs
        return
    if images.dim() != 5 or images.shape[1] != NUM_SEQUENCES:
        raise ValueError(f"{what} must be [B, {NUM_SEQUENCES}, D, H, W], got {tuple(images.shape)}")


def _unet(profile: NetworkProfile, in_channels: int) -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=1,
        channels=profile.localization_channels,
        strides=profile.localization_strides,  # type: ignore[arg-type]  # per-axis strides are supported
        num_res_units=profile.localization_res_units,
        norm="instance",
    )


class Localization(nn.Module):
    """Per-sequence lesion likelihood: ``images [B, S, D, H, W] -> sequence_maps [B, S, D, H, W]`` in ``[0, 1]``."""

    def __init__(self, profile: NetworkProfile, num_sequences: int = NUM_SEQUENCES) -> None:
        super().__init__()
        self.num_sequences = num_sequences
        self.weights_mode = profile.localization_weights
        if self.weights_mode == "shared":
            # one-hot sequence embedding [1, S, S, 1, 1, 1]: sequence s gets channel s set to 1
            onehot = torch.eye(num_sequences).reshape(1, num_sequences, num_sequences, 1, 1, 1)
            self.register_buffer("sequence_embedding", onehot)
            self.unet = _unet(profile, 1 + num_sequences)
        elif self.weights_mode == "per_sequence":
            self.unets = nn.ModuleList(_unet(profile, 1) for _ in range(num_sequences))
        else:
            raise ValueError(f"unknown localization_weights {self.weights_mode!r}")
        # prior-probability bias (RetinaNet style): maps start near sigmoid(-4) = 0.018, so the
        # Dice/focal gradients of the rare lesion voxels are not drowned by the background at start
        self.logit_bias = nn.Parameter(torch.tensor(LOGIT_PRIOR_BIAS))

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Lesion logits ``[B, S, D, H, W]`` (before the sigmoid; used by the training losses)."""
        _check_images(images, "images")
        d, h, w = images.shape[2], images.shape[3], images.shape[4]
        if self.weights_mode == "shared":
            x = images.unsqueeze(2)  # [B, S, 1, D, H, W]
            embedding: torch.Tensor = self.sequence_embedding  # type: ignore[assignment]
            emb = torch.zeros_like(x) + embedding  # [B, S, S, D, H, W]
            x = torch.cat([x, emb], dim=2).reshape(-1, 1 + self.num_sequences, d, h, w)
            logits = self.unet(x)  # [B*S, 1, D, H, W]
            return logits.reshape(-1, self.num_sequences, d, h, w) + self.logit_bias
        return torch.cat([net(images[:, s : s + 1]) for s, net in enumerate(self.unets)], dim=1) + self.logit_bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(images))


class MapFusion(nn.Module):
    """Availability-aware, per-voxel weighted mean of the sequence maps.

    ``(sequence_maps [B,S,D,H,W], availability [B,S], images [B,S,D,H,W]) -> fused_map [B,1,D,H,W]``.

    The weight of sequence ``s`` at voxel ``x`` is a softmax over the *present* sequences
    (``availability > 0.5``) of ``theta_s + g_s(x)``: ``theta`` are 3 learned global logits and ``g`` is a
    small gating network (two 3x3x3 convolutions) reading the images and the sequence maps, so the fusion
    can trust T2W in the transition zone and DWI/ADC in the peripheral zone (PI-RADS v2.1). ``g`` starts
    at 0 (its last convolution is zero-initialised): at initialisation this is the plain mean of the
    available maps. A study with no available sequence at all gets an all-zero map.
    """

    def __init__(self, num_sequences: int = NUM_SEQUENCES, gate_channels: int = 8) -> None:
        super().__init__()
        self.sequence_logits = nn.Parameter(torch.zeros(num_sequences))
        self.gate = nn.Sequential(
            nn.Conv3d(2 * num_sequences, gate_channels, kernel_size=3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv3d(gate_channels, num_sequences, kernel_size=3, padding=1),
        )
        last = self.gate[-1]
        assert isinstance(last, nn.Conv3d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def weights(self, sequence_maps: torch.Tensor, availability: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Fusion weights ``[B, S, D, H, W]``, summing to 1 over the present sequences at every voxel."""
        present = (availability > 0.5).to(sequence_maps.dtype)[:, :, None, None, None]
        # the gate sees only the present sequences' maps (a missing one's map carries no meaning)
        gate_input = torch.cat([images, sequence_maps * present], dim=1)
        logits = self.gate(gate_input) + self.sequence_logits[None, :, None, None, None]
        # the maximum over the present sequences only (a missing one must not push the others' exp() to 0)
        logits = logits - (logits - 1e4 * (1.0 - present)).amax(dim=1, keepdim=True)
        raw = torch.exp(logits.clamp_max(0.0)) * present
        return raw / raw.sum(dim=1, keepdim=True).clamp_min(1e-6)

    def forward(self, sequence_maps: torch.Tensor, availability: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        _check_images(sequence_maps, "sequence_maps")
        w = self.weights(sequence_maps, availability, images)
        return (sequence_maps * w).sum(dim=1, keepdim=True)


class Classification(nn.Module):
    """Scores every voxel: a regression of the PI-RADS-like score, read as an ordinal model.

    ``(images [B,S,D,H,W], fused_map [B,1,D,H,W]) -> (cspca_probability [B,1], pirads_distribution [B,5],
    cspca_map [B,1,D,H,W], score_map [B,1,D,H,W])``.

    A 3D U-Net over the images and the fused map regresses a continuous PI-RADS-like score ``s`` per voxel
    (``score_map``; ~1 in normal tissue). The ordinal reading (cumulative-link model, cut points
    :data:`contract.PIRADS_SCORE_CUTPOINTS` ``c_k``, learned scale ``tau``) is
    ``P(category >= k | x) = sigmoid((s(x) - c_k) / tau)``.

    * ``cspca_map`` = ``sigmoid(a * (s - c_4) / tau + b)``: the calibrated csPCa probability per voxel;
      ``(a, b)`` is the Platt calibration fitted on a validation split (:meth:`set_calibration`; identity
      before). Each lesion candidate (a blob of the fused map) takes this map's peak inside it as its likelihood.
    * ``cspca_probability`` = the maximum of ``cspca_map``: the study is as suspicious as its most suspicious
      lesion, so study and lesion results cannot contradict each other.
    * ``pirads_distribution`` = the ordinal distribution at the study's highest score ``max s``
      (``P(k) = P(>= k) - P(>= k+1)``); the study category is ``pirads_category(max s)``, the highest
      lesion category (1-2 without a lesion).
    """

    def __init__(self, profile: NetworkProfile, num_sequences: int = NUM_SEQUENCES) -> None:
        super().__init__()
        channels = profile.classification_channels
        strides = profile.classification_strides
        if len(strides) != len(channels) - 1:
            raise ValueError("classification_strides needs one entry fewer than classification_channels")
        self.unet = UNet(
            spatial_dims=3,
            in_channels=num_sequences + 1,
            out_channels=1,
            channels=channels,
            strides=strides,  # type: ignore[arg-type]
            num_res_units=profile.classification_res_units,
            norm="instance",
            dropout=profile.dropout,
        )
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.5)))
        self.register_buffer("cutpoints", torch.tensor(PIRADS_SCORE_CUTPOINTS, dtype=torch.float32))
        #: Platt calibration (slope a, intercept b) of the csPCa logit; identity until :meth:`set_calibration`
        self.register_buffer("calibration", torch.tensor([1.0, 0.0], dtype=torch.float32))
        #: category thresholds on the network's raw score, fitted on a validation split (:meth:`set_score_thresholds`);
        #: the score is remapped so that they land on the contract's cut points (identity until then)
        self.register_buffer("score_thresholds", torch.tensor(PIRADS_SCORE_CUTPOINTS, dtype=torch.float32))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the score thresholds existed carry none: they are the identity
        state_dict.setdefault(prefix + "score_thresholds", torch.tensor(PIRADS_SCORE_CUTPOINTS, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def cspca_cutpoint(self) -> torch.Tensor:
        cutpoints: torch.Tensor = self.cutpoints  # type: ignore[assignment]
        return cutpoints[CSPCA_MIN_PIRADS - PIRADS_CATEGORIES[0] - 1]

    def set_calibration(self, slope: float, intercept: float) -> None:
        """Store the Platt calibration ``sigmoid(slope * logit + intercept)`` of the csPCa logit."""
        if not slope > 0:
            raise ValueError(f"calibration slope must be positive (monotone), got {slope}")
        self.calibration.copy_(torch.tensor([slope, intercept], dtype=torch.float32))  # type: ignore[operator]

    def set_score_thresholds(self, thresholds: Sequence[float]) -> None:
        """Store the raw-score thresholds ``t_2 < t_3 < t_4 < t_5`` of the categories (see :meth:`remap_score`)."""
        values = [float(v) for v in thresholds]
        if len(values) != len(PIRADS_SCORE_CUTPOINTS) or any(b - a < MIN_THRESHOLD_GAP for a, b in pairwise(values)):
            raise ValueError(
                f"score thresholds must be {len(PIRADS_SCORE_CUTPOINTS)} values increasing by at least "
                f"{MIN_THRESHOLD_GAP}, got {values}"
            )
        self.score_thresholds.copy_(torch.tensor(values, dtype=torch.float32))  # type: ignore[operator]

    def remap_score(self, raw: torch.Tensor) -> torch.Tensor:
        """Monotone piecewise-linear map of the raw score that sends ``score_thresholds`` onto the cut points.

        Linear between the thresholds, slope 1 below the first and above the last; the identity while the
        thresholds are the cut points (during training). ONNX-friendly: a sum of ``relu`` hinges.
        """
        x: torch.Tensor = self.score_thresholds  # type: ignore[assignment]
        y: torch.Tensor = self.cutpoints  # type: ignore[assignment]
        ones = torch.ones_like(x[:1])
        slopes = torch.cat([ones, (y[1:] - y[:-1]) / (x[1:] - x[:-1]), ones])  # below x_0, between, above x_-1
        out = y[0] + (raw - x[0])
        for i in range(x.shape[0]):
            out = out + (slopes[i + 1] - slopes[i]) * torch.relu(raw - x[i])
        return out

    def raw_score(self, images: torch.Tensor, fused_map: torch.Tensor) -> torch.Tensor:
        """The network's score before :meth:`remap_score` ``[B, 1, D, H, W]`` (what the training losses read)."""
        _check_images(images, "images")
        return 1.0 + self.unet(torch.cat([images, fused_map], dim=1))

    def score(self, images: torch.Tensor, fused_map: torch.Tensor) -> torch.Tensor:
        """The continuous PI-RADS-like score ``s`` ``[B, 1, D, H, W]`` (``score_map``), thresholds applied."""
        return self.remap_score(self.raw_score(images, fused_map))

    def cumulative_logits(self, score: torch.Tensor) -> torch.Tensor:
        """``(s - c_k) / tau`` for every cut point: ``[..., K]`` with ``K = 4`` (``P(>= 2..5)`` before sigmoid)."""
        cutpoints: torch.Tensor = self.cutpoints  # type: ignore[assignment]
        return (score.unsqueeze(-1) - cutpoints) / torch.exp(self.log_tau)

    def cspca_logit(self, score: torch.Tensor) -> torch.Tensor:
        """Uncalibrated csPCa logit ``(s - c_4) / tau`` (same shape as ``score``)."""
        return (score - self.cspca_cutpoint) / torch.exp(self.log_tau)

    def forward(
        self, images: torch.Tensor, fused_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        score = self.score(images, fused_map)
        calibration: torch.Tensor = self.calibration  # type: ignore[assignment]
        cspca_map = torch.sigmoid(calibration[0] * self.cspca_logit(score) + calibration[1])
        cspca_probability = cspca_map.amax(dim=(2, 3, 4))  # [B, 1]
        cumulative = torch.sigmoid(self.cumulative_logits(score.amax(dim=(2, 3, 4))))[:, 0]  # [B, K]
        ones = torch.ones_like(cumulative[:, :1])
        zeros = torch.zeros_like(cumulative[:, :1])
        at_least = torch.cat([ones, cumulative, zeros], dim=1)  # P(>= 1..6)
        pirads_distribution = at_least[:, :-1] - at_least[:, 1:]
        return cspca_probability, pirads_distribution, cspca_map, score


@dataclass
class MpmriNetworks:
    """The three networks of one profile plus the grid they were built for."""

    localization: Localization
    fusion: MapFusion
    classification: Classification
    profile: NetworkProfile
    grid: GridSpec = field(default=DEFAULT_GRID)

    def modules(self) -> dict[str, nn.Module]:
        """The networks keyed by their contract model name (``localization``, ``map_fusion``, ``classification``)."""
        return {
            LOCALIZATION_MODEL: self.localization,
            FUSION_MODEL: self.fusion,
            CLASSIFICATION_MODEL: self.classification,
        }

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules().values():
            yield from module.parameters()

    def train(self, mode: bool = True) -> MpmriNetworks:
        for module in self.modules().values():
            module.train(mode)
        return self

    def eval(self) -> MpmriNetworks:
        return self.train(False)

    def to(self, device: torch.device | str) -> MpmriNetworks:
        for module in self.modules().values():
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """The device the weights are on (all three networks move together, :meth:`to`)."""
        return next(self.localization.parameters()).device

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: module.state_dict() for name, module in self.modules().items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, module in self.modules().items():
            module.load_state_dict(state[name])

    def __call__(self, images: torch.Tensor, availability: torch.Tensor) -> dict[str, torch.Tensor]:
        """The whole chain (what the Triton ensemble computes). Returns tensors keyed by contract tensor name."""
        sequence_maps = self.localization(images)
        fused_map = self.fusion(sequence_maps, availability, images)
        cspca_probability, pirads_distribution, cspca_map, score_map = self.classification(images, fused_map)
        return {
            "sequence_maps": sequence_maps,
            "fused_map": fused_map,
            "cspca_probability": cspca_probability,
            "pirads_distribution": pirads_distribution,
            "cspca_map": cspca_map,
            "score_map": score_map,
        }


def build_networks(profile: str = "cpu", grid: GridSpec = DEFAULT_GRID) -> MpmriNetworks:
    """Fresh (randomly initialised) networks of ``profile`` (a key of :data:`PROFILES`) for ``grid``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown network profile {profile!r}; choose from {sorted(PROFILES)}")
    return build_networks_from_profile(PROFILES[profile], grid)


def build_networks_from_profile(profile: NetworkProfile, grid: GridSpec = DEFAULT_GRID) -> MpmriNetworks:
    """Fresh networks of an explicit :class:`NetworkProfile` (e.g. one read back from a checkpoint)."""
    return MpmriNetworks(
        localization=Localization(profile),
        fusion=MapFusion(),
        classification=Classification(profile),
        profile=profile,
        grid=grid,
    )


# --------------------------------------------------------------------------------------------------
# ONNX export settings (one place, shared by the tests and export/)
# --------------------------------------------------------------------------------------------------
def example_inputs(model_name: str, grid: GridSpec = DEFAULT_GRID, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Random example inputs for ``model_name`` (contract name), shapes from :func:`contract.tensor_specs`."""
    specs = tensor_specs(grid)
    gen = torch.Generator().manual_seed(0)
    inputs: list[torch.Tensor] = []
    for name in MODEL_IO[model_name][0]:
        shape = (batch, *specs[name].shape)
        if name == "availability":
            inputs.append(torch.ones(shape))
        else:
            inputs.append(torch.rand(shape, generator=gen))
    return tuple(inputs)


def export_kwargs(model_name: str) -> dict[str, Any]:
    """Keyword arguments for ``torch.onnx.export(module, example_inputs, path, **export_kwargs(name))``.

    TorchScript exporter (``dynamo=False``), opset :data:`ONNX_OPSET`, tensor names from
    :data:`contract.MODEL_IO`, axis 0 of every input and output dynamic (``"batch"``).
    """
    inputs, outputs = MODEL_IO[model_name]
    return {
        "input_names": list(inputs),
        "output_names": list(outputs),
        "dynamic_axes": {name: {0: "batch"} for name in (*inputs, *outputs)},
        "opset_version": ONNX_OPSET,
        "do_constant_folding": True,
        "dynamo": False,
    }
