"""Acquisition protocols: which series a study has, their geometry (LPS) and vendor naming."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from contract import GridGeometry
from synth.anatomy import rotation_matrix

VENDORS = ("siemens", "ge", "philips")

MANUFACTURER = {
    "siemens": ("SIEMENS", ("Skyra", "Prisma", "Vida", "Aera")),
    "ge": ("GE MEDICAL SYSTEMS", ("SIGNA Architect", "DISCOVERY MR750", "SIGNA Premier")),
    "philips": ("Philips", ("Ingenia", "Achieva", "Ingenia Elition X")),
}

#: the axial/sagittal/coronal in-plane directions (row u, column v) and slice normal w = u x v
PLANE_AXES = {
    "tra": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
    "sag": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    "cor": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
}


@dataclasses.dataclass(frozen=True)
class SeriesPlan:
    """One series to synthesize.

    Attributes:
        key: short key ("t2w_tra", "t2w_sag", "t2w_cor", "dwi", "dwi_lowb", "adc", "localizer").
        sequence: "t2w" | "adc" | "dwi" | "other".
        plane: "tra" | "sag" | "cor".
        geometry: voxel grid (for the localizer: one grid per instance in ``localizer_slices``).
        description / protocol_name: vendor-styled SeriesDescription / ProtocolName.
        image_type: DICOM ImageType values.
        b_values: DWI b-values (s/mm^2) stored in this series (one instance per slice per b).
        series_number: SeriesNumber.
        rescale_slope: stored = value / slope (None: no rescale tags).
        signed: int16 instead of uint16 pixels.
        shuffle_instances: InstanceNumber order not following the slice position.
    """

    key: str
    sequence: str
    plane: str
    geometry: GridGeometry
    description: str
    protocol_name: str
    image_type: tuple[str, ...]
    series_number: int
    b_values: tuple[float, ...] = ()
    rescale_slope: float | None = None
    signed: bool = False
    shuffle_instances: bool = False
    localizer_slices: tuple[GridGeometry, ...] = ()
    scanning_sequence: str = "SE"
    sequence_variant: str = "SK\\SP"
    echo_time_ms: float = 100.0
    repetition_time_ms: float = 4000.0


def make_geometry(
    center_lps_mm: np.ndarray,
    axes: np.ndarray,
    spacing_mm_ijk: tuple[float, float, float],
    size_ijk: tuple[int, int, int],
) -> GridGeometry:
    """Grid whose volume centre is ``center_lps_mm``; ``axes`` columns = unit vectors of i, j, k."""
    s = np.asarray(spacing_mm_ijk, dtype=np.float64)
    n = np.asarray(size_ijk, dtype=np.float64)
    origin = np.asarray(center_lps_mm, dtype=np.float64) - axes @ (s * (n - 1) / 2)
    return GridGeometry(
        origin_lps_mm=tuple(round(float(v), 4) for v in origin),  # type: ignore[arg-type]
        direction=tuple(round(float(v), 8) for v in axes.reshape(-1)),
        spacing_mm_ijk=tuple(round(float(v), 6) for v in s),  # type: ignore[arg-type]
        size_ijk=tuple(int(v) for v in size_ijk),  # type: ignore[arg-type]
    )


def plane_axes(plane: str, rotation: np.ndarray) -> np.ndarray:
    u, v = PLANE_AXES[plane]
    u, v = rotation @ u, rotation @ v
    return np.stack([u, v, np.cross(u, v)], axis=1)


def volume_center(geom: GridGeometry) -> np.ndarray:
    ni, nj, nk = geom.size_ijk
    return np.asarray(geom.index_to_lps([(nk - 1) / 2, (nj - 1) / 2, (ni - 1) / 2]))


@dataclasses.dataclass(frozen=True)
class ProtocolOptions:
    """Probabilities of the optional series and of obliquity (see SynthConfig)."""

    p_oblique: float = 0.30
    p_oblique_dwi_only: float = 0.4
    oblique_deg: tuple[float, float] = (2.0, 6.0)
    p_sagittal: float = 0.40
    p_coronal: float = 0.15
    p_localizer: float = 0.30
    p_multi_b: float = 0.5
    p_low_b_series: float = 0.5
    p_shuffle_instances: float = 0.3
    max_gland_offset_inplane_mm: float = 5.0
    max_gland_offset_z_mm: float = 3.0


@dataclasses.dataclass(frozen=True)
class Protocol:
    vendor: str
    manufacturer: str
    model_name: str
    field_strength_t: float
    oblique: str  # "none" | "all" | "dwi"
    oblique_rotation: np.ndarray
    series: tuple[SeriesPlan, ...]


def sample_protocol(
    rng: np.random.Generator, gland_center_lps_mm: np.ndarray, gland_half_extent_mm: np.ndarray, opt: ProtocolOptions
) -> Protocol:
    """Draw vendor, series list and geometries around a gland centred at ``gland_center_lps_mm``.

    ``gland_half_extent_mm`` (3,) is the gland's half extent along LPS x, y, z; the T2W volume centre
    is offset from the gland centre by at most ``max_gland_offset_*`` (less when the gland is large).
    """
    vendor = str(rng.choice(VENDORS))
    manufacturer, models = MANUFACTURER[vendor]
    model = str(rng.choice(models))
    field = float(rng.choice([1.5, 3.0, 3.0]))
    oblique = "none"
    rot_all = np.eye(3)
    rot_dwi = np.eye(3)
    if rng.random() < opt.p_oblique:
        axis = rng.normal(size=3) * np.array([1.0, 1.0, 0.5])
        rot = rotation_matrix(axis, math.radians(rng.uniform(*opt.oblique_deg)) * float(rng.choice([-1, 1])))
        if rng.random() < opt.p_oblique_dwi_only:
            oblique, rot_dwi = "dwi", rot
        else:
            oblique, rot_all, rot_dwi = "all", rot, rot
    # T2W axial: gland centre within the allowed offset of the volume centre
    axes_t2 = plane_axes("tra", rot_all)
    half = np.asarray(gland_half_extent_mm, dtype=np.float64)
    lim = np.array(
        [
            max(0.0, min(opt.max_gland_offset_inplane_mm, 38.0 - half[0])),
            max(0.0, min(opt.max_gland_offset_inplane_mm, 38.0 - half[1])),
            max(0.0, min(opt.max_gland_offset_z_mm, 23.0 - half[2])),
        ]
    )
    offset = rng.uniform(-1, 1, size=3) * lim
    t2_center = gland_center_lps_mm - axes_t2 @ offset
    matrix = int(rng.choice([320, 336, 352, 368, 384]))
    pix = float(rng.uniform(0.47, 0.6))
    n_t2 = int(rng.integers(20, 25))
    thick_t2 = 3.0
    t2_geom = make_geometry(t2_center, axes_t2, (pix, pix, thick_t2), (matrix, matrix, n_t2))
    names = _names(vendor, rng)
    plans: list[SeriesPlan] = []
    number = 1

    def next_number(step: int = 1) -> int:
        nonlocal number
        number += step
        return number

    t2_common = {
        "scanning_sequence": "SE",
        "sequence_variant": "SK\\SP\\OSP",
        "echo_time_ms": float(rng.uniform(90, 120)),
        "repetition_time_ms": float(rng.uniform(3500, 6500)),
        "rescale_slope": round(float(rng.uniform(1.2, 3.5)), 6) if vendor == "philips" else None,
        "signed": vendor == "philips",
    }
    if rng.random() < opt.p_localizer:
        loc_slices = _localizer_slices(rng, t2_center)
        plans.append(
            SeriesPlan(
                "localizer",
                "other",
                "tra",
                loc_slices[0],
                names["localizer"],
                names["localizer"],
                ("ORIGINAL", "PRIMARY", "LOCALIZER"),
                number,
                localizer_slices=loc_slices,
                scanning_sequence="GR",
                sequence_variant="SP",
                echo_time_ms=1.5,
                repetition_time_ms=4.0,
            )
        )
    for plane, p in (("sag", opt.p_sagittal), ("cor", opt.p_coronal)):
        if rng.random() >= p:
            continue
        axes = plane_axes(plane, rot_all)
        m = int(rng.choice([320, 384]))
        px = float(rng.uniform(0.5, 0.65))
        n = int(rng.integers(19, 27))
        thick = float(rng.choice([3.0, 3.5, 4.0]))
        center = gland_center_lps_mm + rng.uniform(-6, 6, size=3)
        geom = make_geometry(center, axes, (px, px, thick), (m, m, n))
        plans.append(
            SeriesPlan(
                f"t2w_{plane}",
                "t2w",
                plane,
                geom,
                names[f"t2_{plane}"],
                names[f"t2_{plane}"],
                names["t2_image_type"],
                next_number(),
                shuffle_instances=bool(rng.random() < opt.p_shuffle_instances),
                **t2_common,  # type: ignore[arg-type]
            )
        )
    plans.append(
        SeriesPlan(
            "t2w_tra",
            "t2w",
            "tra",
            t2_geom,
            names["t2_tra"],
            names["t2_tra"],
            names["t2_image_type"],
            next_number(),
            shuffle_instances=bool(rng.random() < opt.p_shuffle_instances),
            **t2_common,  # type: ignore[arg-type]
        )
    )
    # DWI / ADC: 128 matrix, ~2 mm, 3-3.6 mm slices, fewer slices, own origin
    axes_dwi = plane_axes("tra", rot_dwi)
    fov = float(rng.uniform(240, 280))
    d_pix = fov / 128
    thick = float(rng.choice([3.0, 3.3, 3.5, 3.6]))
    n_min = math.ceil(56.0 / thick)
    n_dwi = int(rng.integers(n_min, max(n_min, n_t2 - 1) + 1))
    dwi_center = t2_center + axes_dwi @ np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-2.5, 2.5)])
    dwi_geom = make_geometry(dwi_center, axes_dwi, (d_pix, d_pix, thick), (128, 128, n_dwi))
    dwi_common = {
        "scanning_sequence": "EP",
        "sequence_variant": "SK\\SP",
        "echo_time_ms": float(rng.uniform(60, 90)),
        "repetition_time_ms": float(rng.uniform(3500, 6000)),
    }
    multi = bool(rng.random() < opt.p_multi_b)
    dwi_slope = round(float(rng.uniform(1.0, 2.5)), 6) if vendor == "philips" else None
    if multi:
        b_values = names["multi_b_values"]
        plans.append(
            SeriesPlan(
                "dwi",
                "dwi",
                "tra",
                dwi_geom,
                names["dwi_multi"],
                names["dwi_multi"],
                names["dwi_image_type"],
                next_number(),
                b_values=b_values,
                rescale_slope=dwi_slope,
                shuffle_instances=bool(rng.random() < opt.p_shuffle_instances),
                **dwi_common,  # type: ignore[arg-type]
            )
        )
    else:
        if rng.random() < opt.p_low_b_series:
            plans.append(
                SeriesPlan(
                    "dwi_lowb",
                    "dwi",
                    "tra",
                    dwi_geom,
                    names["dwi_low"],
                    names["dwi_low"],
                    names["dwi_image_type"],
                    next_number(),
                    b_values=(names["low_b"],),
                    rescale_slope=dwi_slope,
                    **dwi_common,  # type: ignore[arg-type]
                )
            )
        plans.append(
            SeriesPlan(
                "dwi",
                "dwi",
                "tra",
                dwi_geom,
                names["dwi_high"],
                names["dwi_high"],
                names["dwi_high_image_type"],
                next_number(),
                b_values=(names["high_b"],),
                rescale_slope=dwi_slope,
                shuffle_instances=bool(rng.random() < opt.p_shuffle_instances),
                **dwi_common,  # type: ignore[arg-type]
            )
        )
    adc_name = names["adc_multi"] if multi else names["adc_single"]
    plans.append(
        SeriesPlan(
            "adc",
            "adc",
            "tra",
            dwi_geom,
            adc_name,
            adc_name,
            names["adc_image_type"],
            next_number(),
            rescale_slope=1.0 if vendor == "philips" else None,
            **dwi_common,  # type: ignore[arg-type]
        )
    )
    return Protocol(vendor, manufacturer, f"{model}", field, oblique, rot_dwi, tuple(plans))


def adc_fit_b_values(protocol: Protocol) -> tuple[float, ...]:
    """b-values the scanner used for the ADC map (those stored, or an internal low/high pair)."""
    stored = sorted({b for p in protocol.series if p.sequence == "dwi" for b in p.b_values})
    if len(stored) >= 2:
        return tuple(stored)
    low = 0.0 if protocol.vendor == "philips" else 50.0
    return (low, *stored)


def _localizer_slices(rng: np.random.Generator, center: np.ndarray) -> tuple[GridGeometry, ...]:
    px = float(rng.uniform(1.5, 1.9))
    thick = float(rng.choice([6.0, 8.0, 10.0]))
    n_per_plane = int(rng.choice([1, 3]))
    slices = []
    for plane in ("sag", "cor", "tra"):
        axes = plane_axes(plane, np.eye(3))
        for s in range(n_per_plane):
            offset = (s - (n_per_plane - 1) / 2) * 10.0
            c = center + axes[:, 2] * offset + rng.uniform(-5, 5, size=3)
            slices.append(make_geometry(c, axes, (px, px, thick), (256, 256, 1)))
    return tuple(slices)


def _names(vendor: str, rng: np.random.Generator) -> dict:  # type: ignore[type-arg]
    """Vendor-styled SeriesDescription/ProtocolName and ImageType values."""
    if vendor == "siemens":
        high = 1400.0
        return {
            "t2_tra": "t2_tse_tra",
            "t2_sag": "t2_tse_sag",
            "t2_cor": "t2_tse_cor",
            "t2_image_type": ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"),
            "localizer": str(rng.choice(["localizer", "3-plane loc"])),
            "multi_b_values": (50.0, 400.0, 800.0, 1400.0),
            "dwi_multi": "ep2d_diff_b50_400_800_1400",
            "adc_multi": "ep2d_diff_b50_400_800_1400_ADC",
            "low_b": 50.0,
            "high_b": high,
            "dwi_low": "ep2d_diff_b50_TRACEW",
            "dwi_high": "ep2d_diff_b1400_TRACEW",
            "adc_single": "ep2d_diff_b50_1400_ADC",
            "dwi_image_type": ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "NORM"),
            "dwi_high_image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "NORM"),
            "adc_image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND", "NORM"),
        }
    if vendor == "ge":
        return {
            "t2_tra": "Ax T2 FRFSE",
            "t2_sag": "Sag T2 FRFSE",
            "t2_cor": "Cor T2 FRFSE",
            "t2_image_type": ("ORIGINAL", "PRIMARY", "OTHER"),
            "localizer": str(rng.choice(["3-plane loc", "localizer"])),
            "multi_b_values": (50.0, 800.0, 1400.0),
            "dwi_multi": "Ax DWI b50_800_1400",
            "adc_multi": "Apparent Diffusion Coefficient (mm2/s)",
            "low_b": 50.0,
            "high_b": 1400.0,
            "dwi_low": "Ax DWI b50",
            "dwi_high": "Ax DWI b1400",
            "adc_single": "Apparent Diffusion Coefficient (mm2/s)",
            "dwi_image_type": ("ORIGINAL", "PRIMARY", "OTHER"),
            "dwi_high_image_type": ("ORIGINAL", "PRIMARY", "OTHER"),
            "adc_image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
        }
    return {
        "t2_tra": "T2W_TSE_ax",
        "t2_sag": "T2W_TSE_sag",
        "t2_cor": "T2W_TSE_cor",
        "t2_image_type": ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"),
        "localizer": "Survey",
        "multi_b_values": (0.0, 1000.0, 1400.0),
        "dwi_multi": "DWI_b0_1000_1400",
        "adc_multi": "dADC",
        "low_b": 0.0,
        "high_b": 1400.0,
        "dwi_low": "DWI_b0",
        "dwi_high": "sDWI b1400",
        "adc_single": "dADC",
        "dwi_image_type": ("ORIGINAL", "PRIMARY", "DIFFUSION", "M_SE", "M", "SE"),
        "dwi_high_image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "M_SE", "M", "SE"),
        "adc_image_type": ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ADC_SE"),
    }
