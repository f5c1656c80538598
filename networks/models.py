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
* :class:`MapFusion` is a weighted mean of the sequence maps over the *present* sequences only:
  ``w_s = a_s * exp(theta_s) / sum_t a_t * exp(theta_t)`` (a softmax of learned logits ``theta``
  renormalized over the available sequences), so a study without ADC/DWI still gets a map in
  ``[0, 1]`` built from T2W.
* :class:`Classification` reads the images plus the fused map and returns the study-level csPCa
  probability ``[B, 1]`` and a PI-RADS-like distribution ``[B, 5]`` (softmax over categories 1-5).

The grid is anisotropic (3 mm slices, 1.5 mm in-plane), so the first down-sampling step keeps the
slice axis (stride ``(1, 2, 2)``).

ONNX: every module exports with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``)
at :data:`ONNX_OPSET` with a dynamic batch axis; :func:`export_kwargs` returns the exact arguments
(names from :data:`contract.MODEL_IO`). The dynamo exporter is slower and was not needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import UNet
from torch import nn

from contract import (
    CLASSIFICATION_MODEL,
    DEFAULT_GRID,
    FUSION_MODEL,
    LOCALIZATION_MODEL,
    MODEL_IO,
    NUM_PIRADS,
    NUM_SEQUENCES,
    GridSpec,
    tensor_specs,
)

#: ONNX opset used by :func:`export_kwargs` (TorchScript exporter, ``dynamo=False``).
ONNX_OPSET: int = 17

Strides = tuple[tuple[int, int, int], ...]
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
        classification_channels: encoder channels per stage of the classifier.
        classification_strides: encoder strides per stage (first stage included).
        classification_hidden: width of the classifier's hidden layer.
        dropout: dropout before the classifier heads.
    """

    name: str
    localization_channels: tuple[int, ...] = (8, 16, 32, 64)
    localization_strides: Strides = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    localization_res_units: int = 1
    localization_weights: str = "shared"
    classification_channels: tuple[int, ...] = (8, 16, 32, 64)
    classification_strides: Strides = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    classification_hidden: int = 32
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
        classification_hidden=64,
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
    """Availability-aware weighted mean: ``(sequence_maps [B,S,D,H,W], availability [B,S]) -> fused_map [B,1,D,H,W]``.

    Weights are a softmax of learned per-sequence logits restricted to the present sequences
    (``availability > 0.5``); with all logits 0 (the initial value) this is the plain mean of the
    available maps. A study with no available sequence at all gets an all-zero map.
    """

    def __init__(self, num_sequences: int = NUM_SEQUENCES) -> None:
        super().__init__()
        self.sequence_logits = nn.Parameter(torch.zeros(num_sequences))

    def weights(self, availability: torch.Tensor) -> torch.Tensor:
        """Fusion weights ``[B, S]``, summing to 1 over the present sequences."""
        present = (availability > 0.5).to(self.sequence_logits.dtype)
        raw = torch.exp(self.sequence_logits - self.sequence_logits.max()) * present
        return raw / raw.sum(dim=1, keepdim=True).clamp_min(1e-6)

    def forward(self, sequence_maps: torch.Tensor, availability: torch.Tensor) -> torch.Tensor:
        _check_images(sequence_maps, "sequence_maps")
        w = self.weights(availability)
        return (sequence_maps * w[:, :, None, None, None]).sum(dim=1, keepdim=True)


class Classification(nn.Module):
    """Study-level heads: ``(images [B,S,D,H,W], fused_map [B,1,D,H,W]) -> (cspca_probability [B,1], pirads [B,5])``.

    A small residual 3D encoder over ``S + 1`` channels, global average + max pooling, plus two
    features of the fused map itself (its maximum and mean), then a hidden layer and two heads.
    """

    def __init__(self, profile: NetworkProfile, num_sequences: int = NUM_SEQUENCES) -> None:
        super().__init__()
        channels = profile.classification_channels
        strides = profile.classification_strides
        if len(channels) != len(strides):
            raise ValueError("classification_channels and classification_strides must have the same length")
        blocks: list[nn.Module] = []
        in_ch = num_sequences + 1
        for out_ch, stride in zip(channels, strides, strict=True):
            blocks.append(
                ResidualUnit(
                    spatial_dims=3, in_channels=in_ch, out_channels=out_ch, strides=stride, subunits=2, norm="instance"
                )
            )
            in_ch = out_ch
        blocks.append(
            Convolution(spatial_dims=3, in_channels=in_ch, out_channels=in_ch, kernel_size=1, norm="instance")
        )
        self.encoder = nn.Sequential(*blocks)
        features = 2 * in_ch + 2
        self.head = nn.Sequential(
            nn.Linear(features, profile.classification_hidden),
            nn.ReLU(),
            nn.Dropout(profile.dropout),
        )
        self.cspca = nn.Linear(profile.classification_hidden, 1)
        self.pirads = nn.Linear(profile.classification_hidden, NUM_PIRADS)

    def forward_logits(self, images: torch.Tensor, fused_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cspca_logit [B, 1], pirads_logits [B, 5])`` before sigmoid/softmax (used by the losses)."""
        _check_images(images, "images")
        x = self.encoder(torch.cat([images, fused_map], dim=1))
        pooled = torch.cat(
            [
                x.mean(dim=(2, 3, 4)),
                x.amax(dim=(2, 3, 4)),
                fused_map.amax(dim=(1, 2, 3, 4)).unsqueeze(1),
                fused_map.mean(dim=(1, 2, 3, 4)).unsqueeze(1),
            ],
            dim=1,
        )
        hidden = self.head(pooled)
        return self.cspca(hidden), self.pirads(hidden)

    def forward(self, images: torch.Tensor, fused_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cspca_logit, pirads_logits = self.forward_logits(images, fused_map)
        return torch.sigmoid(cspca_logit), torch.softmax(pirads_logits, dim=1)


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

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: module.state_dict() for name, module in self.modules().items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, module in self.modules().items():
            module.load_state_dict(state[name])

    def __call__(self, images: torch.Tensor, availability: torch.Tensor) -> dict[str, torch.Tensor]:
        """The whole chain (what the Triton ensemble computes). Returns tensors keyed by contract tensor name."""
        sequence_maps = self.localization(images)
        fused_map = self.fusion(sequence_maps, availability)
        cspca_probability, pirads_distribution = self.classification(images, fused_map)
        return {
            "sequence_maps": sequence_maps,
            "fused_map": fused_map,
            "cspca_probability": cspca_probability,
            "pirads_distribution": pirads_distribution,
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
