"""Acquisition artifacts of the EPI diffusion series (generator version 3).

Rectal-gas susceptibility artifact (PI-RADS v2.1 names it as the main DWI artifact): at the air/tissue
interface of a gas-filled rectum the EPI readout mis-maps signal along the phase-encoding direction
(anterior-posterior). Tissue signal is shifted towards the rectum and piles up in a bright band at the
posterior border of the gland, next to a zone of signal loss. It is a property of the DWI acquisition, so
it scales every b-value by the same factor: the ADC fitted from the DWI is not lowered by it, and T2W
(a fast spin-echo sequence, not EPI) does not show it.

Coordinates: LPS mm (y: posterior +). Arrays are ``(D, H, W)`` on the DWI grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from contract import GridGeometry
from synth import anatomy as anat

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class DwiArtifactRanges:
    """Sampling ranges of the rectal-gas susceptibility artifact (docs/synthetic_studies.md).

    Attributes:
        p_given_rectal_gas: probability of the artifact in a study whose rectal lumen is gas (0 with fluid).
        depth_fraction: centre of the pile-up along the gland's posterior semi-axis (1 = gland border).
        semi_axes_mm: semi-axes (LR, AP, SI) of the pile-up band (Gaussian profile, 1/e at the semi-axis).
        peak_gain: DWI signal factor at the centre of the pile-up (same at every b-value).
        loss_depth: fractional signal loss at the centre of the signal void next to the pile-up.
        shift_mm: maximum geometric displacement along the phase-encoding (AP) direction, towards the rectum.
    """

    p_given_rectal_gas: float = 0.5
    depth_fraction: tuple[float, float] = (0.7, 0.95)
    semi_axes_mm: tuple[tuple[float, float], ...] = ((5.0, 11.0), (2.0, 3.5), (4.0, 9.0))
    peak_gain: tuple[float, float] = (2.0, 5.0)
    loss_depth: tuple[float, float] = (0.4, 0.8)
    shift_mm: tuple[float, float] = (1.5, 4.0)


@dataclasses.dataclass(frozen=True)
class DwiArtifact:
    """One sampled susceptibility artifact. ``center_lps_mm``: centre of the pile-up band; ``rotation``:
    the gland's axes (LR, AP, SI); ``loss_center_lps_mm``: centre of the signal void (anterior to the
    pile-up, where the shifted signal came from)."""

    center_lps_mm: np.ndarray
    semi_axes_mm: np.ndarray
    rotation: np.ndarray
    peak_gain: float
    loss_center_lps_mm: np.ndarray
    loss_depth: float
    shift_mm: float


def has_rectal_gas(anatomy: anat.Anatomy) -> bool:
    """Whether the rectal lumen of ``anatomy`` is gas (rather than fluid)."""
    return any(name == "rectal_gas" for name, _ in anatomy.structures)


def sample_dwi_artifact(
    rng: np.random.Generator, anatomy: anat.Anatomy, ranges: DwiArtifactRanges
) -> DwiArtifact | None:
    """Draw the artifact of one study (None for a fluid-filled rectum or with probability ``1 - p``).

    Always draws the same number of random values, so the other studies' draws do not depend on it.
    """
    draws = rng.random(9)
    if not has_rectal_gas(anatomy) or draws[0] >= ranges.p_given_rectal_gas:
        return None
    gl = anatomy.gland

    def pick(u: float, lo_hi: tuple[float, float]) -> float:
        return float(lo_hi[0] + u * (lo_hi[1] - lo_hi[0]))

    semi = np.array([pick(u, r) for u, r in zip(draws[1:4], ranges.semi_axes_mm, strict=True)])
    depth = pick(draws[4], ranges.depth_fraction)
    lateral = (draws[5] - 0.5) * 0.4  # within the central 40 % of the LR extent (the rectum is midline)
    local = np.array([lateral * gl.semi_axes_mm[0], depth * gl.semi_axes_mm[1], 0.0])
    center = gl.center_lps_mm + gl.rotation @ local
    loss_center = center - gl.rotation @ np.array([0.0, 1.6 * semi[1], 0.0])
    return DwiArtifact(
        center_lps_mm=center,
        semi_axes_mm=semi,
        rotation=gl.rotation,
        peak_gain=pick(draws[6], ranges.peak_gain),
        loss_center_lps_mm=loss_center,
        loss_depth=pick(draws[7], ranges.loss_depth),
        shift_mm=pick(draws[8], ranges.shift_mm),
    )


def _profile(
    geom: GridGeometry, block: anat.Block, center: np.ndarray, artifact: DwiArtifact, widen: float
) -> np.ndarray:
    q = anat.local_coords(geom, block, center, artifact.rotation, artifact.semi_axes_mm * widen)
    return np.exp(-(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]))


def apply_dwi_artifact(artifact: DwiArtifact, geom: GridGeometry, s0: np.ndarray, adc: np.ndarray) -> None:
    """Distort ``s0`` and ``adc`` (noise-free maps on ``geom``) in place.

    The tissue near the artifact is displaced towards the rectum along the phase-encoding (AP) direction
    (both maps: the same tissue is imaged at every b-value), then ``s0`` is multiplied by the pile-up /
    signal-loss gain. ``adc`` is never scaled, so ``S0 exp(-b ADC)`` changes by the same factor at every b.
    """
    extent = anat.Shape(artifact.center_lps_mm, artifact.semi_axes_mm * 3.0, artifact.rotation)
    block = anat.shape_block(geom, extent, margin_mm=2.0 * artifact.shift_mm)
    if block is None:
        return
    sl = tuple(slice(a, b) for a, b in block)
    # geometric distortion: the image at p shows the tissue at p - shift(p) * posterior
    shift = F32(artifact.shift_mm) * _profile(geom, block, artifact.center_lps_mm, artifact, 1.8)
    posterior = artifact.rotation[:, 1]
    step_ijk = geom.direction_matrix.T @ posterior / np.asarray(geom.spacing_mm_ijk)
    grids = np.meshgrid(*(np.arange(a, b, dtype=F32) for a, b in block), indexing="ij")
    coords = [grids[axis] - shift * F32(step_ijk[2 - axis]) for axis in range(3)]  # (k, j, i) <- (i, j, k)
    for volume in (s0, adc):
        volume[sl] = ndimage.map_coordinates(volume, coords, order=1, mode="nearest")
    gain = F32(1) + F32(artifact.peak_gain - 1.0) * _profile(geom, block, artifact.center_lps_mm, artifact, 1.0)
    gain -= F32(artifact.loss_depth) * _profile(geom, block, artifact.loss_center_lps_mm, artifact, 1.0)
    s0[sl] *= np.maximum(gain, F32(0.05))


def artifact_truth(artifact: DwiArtifact | None) -> dict[str, object]:
    """The ground_truth.json fields of the artifact (generator version 3)."""
    if artifact is None:
        return {"dwi_artifact": False, "dwi_artifact_center_lps_mm": None, "dwi_artifact_peak_gain": None}
    return {
        "dwi_artifact": True,
        "dwi_artifact_center_lps_mm": [round(float(v), 4) for v in artifact.center_lps_mm],
        "dwi_artifact_peak_gain": round(float(artifact.peak_gain), 3),
    }
