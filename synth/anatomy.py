"""Pelvic anatomy and lesions in physical (LPS, mm) space, rendered on any voxel grid.

The anatomy is a set of analytic shapes (ellipsoids, elliptic cylinders) with per-tissue properties
``(t2, s0, adc)``:

* ``t2``: T2-weighted signal (arbitrary units, before the per-study scale and the bias field),
* ``s0``: diffusion signal at b = 0 (arbitrary units; fat is suppressed),
* ``adc``: apparent diffusion coefficient in 1e-6 mm^2/s.

Because every shape is defined in patient space, rendering it on each series' own grid
(:class:`contract.GridGeometry`) makes all series agree geometrically, whatever their
orientation, field of view, spacing or origin.

Coordinates: LPS (x: patient left +, y: posterior +, z: superior +). Arrays are ``(D, H, W)`` =
``(k, j, i)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from contract import GridGeometry

F32 = np.float32

#: zone codes of :func:`zone_map`
ZONE_OUTSIDE, ZONE_PZ, ZONE_TZ, ZONE_AFMS = 0, 1, 2, 3
ZONE_NAMES = {ZONE_PZ: "pz", ZONE_TZ: "tz", ZONE_AFMS: "afms"}

#: lesion kinds; ``bph_nodule`` is a glandular BPH nodule (the name predates the stromal type); ``cyst``
#: (retention cyst / cystic BPH, T2 shine-through on DWI) is an incidental extra, see :func:`add_incidental_cyst`
LESION_KINDS = ("cancer", "bph_nodule", "bph_stromal", "inflammation", "haemorrhage", "cyst")
#: benign mimics (every kind but ``cancer``)
MIMIC_KINDS = LESION_KINDS[1:]
#: zones each kind is placed in (PI-RADS v2.1: BPH in the TZ, prostatitis and post-biopsy blood in the PZ)
LESION_ZONES: dict[str, tuple[str, ...]] = {
    "cancer": ("pz", "tz"),
    "bph_nodule": ("tz",),
    "bph_stromal": ("tz",),
    "inflammation": ("pz",),
    "haemorrhage": ("pz",),
    "cyst": ("pz", "tz"),
}
#: b-value (s/mm^2) at which the "DWI marked" rule of :func:`pirads_category` is evaluated
PIRADS_DWI_B_VALUE = 1400.0
#: lesion/background high-b signal ratio from which DWI is "marked" (:func:`pirads_category`)
PIRADS_DWI_MARKED_RATIO = 2.0
#: ADC (1e-6 mm^2/s) below which a mimic is PI-RADS 3 (if DWI is also marked)
PIRADS_MIMIC_ADC_THRESHOLD = 1100.0
#: csPCa of at least this maximum diameter (mm) is PI-RADS 5, smaller ones 4
PIRADS_5_DIAMETER_MM = 15.0


@dataclasses.dataclass(frozen=True)
class Tissue:
    """Properties of one tissue. ``t2``/``s0`` arbitrary units, ``adc`` in 1e-6 mm^2/s."""

    t2: float
    s0: float
    adc: float


@dataclasses.dataclass(frozen=True)
class Shape:
    """An ellipsoid (or an elliptic cylinder when ``cylinder``) in LPS mm.

    Attributes:
        center_lps_mm: centre (3,).
        semi_axes_mm: semi-axes along the local axes (3,) (the third is ignored for a cylinder).
        rotation: 3x3, column ``c`` = LPS unit vector of local axis ``c``.
        cylinder: infinite along local axis 2.
    """

    center_lps_mm: np.ndarray
    semi_axes_mm: np.ndarray
    rotation: np.ndarray
    cylinder: bool = False

    def half_extent_mm(self, direction_lps: np.ndarray) -> float:
        """Half extent of the shape along the LPS unit vector ``direction_lps`` (mm)."""
        local = self.rotation.T @ np.asarray(direction_lps, dtype=np.float64)
        return float(np.sqrt(np.sum((local * self.semi_axes_mm) ** 2)))


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One lesion. ``shape`` is its nominal ellipsoid; the rendered blob is irregular (``bumps``)."""

    kind: str  # one of LESION_KINDS
    zone: str  # "pz" | "tz"
    shape: Shape
    tissue: Tissue  # core properties
    rim_t2: float | None  # T2 of the dark capsule (BPH nodules), None for no rim
    edge_mm: float  # soft-edge width: small = well defined, large = ill-defined
    bumps: tuple[float, ...]  # shape-irregularity coefficients (see _lesion_weight)
    texture_t2: float  # relative T2 heterogeneity inside the lesion
    significant: bool
    dwi_contrast: float  # noise-free b=1400 signal ratio lesion / zone background
    pirads: int

    @property
    def diameter_mm(self) -> float:
        """Maximum nominal diameter (mm)."""
        return float(2.0 * np.max(self.shape.semi_axes_mm))


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """A sampled pelvis: gland, zones, surrounding structures, lesions and tissue properties."""

    gland: Shape
    tz: Shape  # in LPS (a sub-ellipsoid of the gland)
    afms_fraction: float  # anterior part (local y/b below -afms_fraction) outside TZ is AFMS
    tissues: dict[str, Tissue]
    structures: tuple[tuple[str, Shape], ...]  # painted in order before the gland
    textures: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (wave vectors [n,3] 1/mm, phases [n])
    lesions: tuple[Lesion, ...]

    def gland_radius(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Normalized ellipsoid radius of the gland at ``points`` ``[..., 3]`` (<= 1 inside)."""
        q = (np.asarray(points_lps_mm, dtype=np.float64) - self.gland.center_lps_mm) @ self.gland.rotation
        return np.sqrt(np.sum((q / self.gland.semi_axes_mm) ** 2, axis=-1))

    def zone_at(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Zone codes (ZONE_*) at ``points`` ``[..., 3]``."""
        p = np.asarray(points_lps_mm, dtype=np.float64)
        r_gland = self.gland_radius(p)
        q = (p - self.gland.center_lps_mm) @ self.gland.rotation / self.gland.semi_axes_mm
        qt = (p - self.tz.center_lps_mm) @ self.tz.rotation / self.tz.semi_axes_mm
        in_tz = np.sum(qt**2, axis=-1) <= 1.0
        afms = (q[..., 1] < -self.afms_fraction) & (np.abs(q[..., 0]) < 0.6)
        zone = np.full(r_gland.shape, ZONE_PZ, dtype=np.uint8)
        zone[afms] = ZONE_AFMS
        zone[in_tz] = ZONE_TZ
        zone[r_gland > 1.0] = ZONE_OUTSIDE
        return zone


# --------------------------------------------------------------------------------------------------
# PI-RADS-like rules (the ONE place they live; documented in docs/synthetic_studies.md)
# --------------------------------------------------------------------------------------------------
def pirads_category(kind: str, diameter_mm: float, adc_um2_per_s: float, dwi_contrast: float) -> int:
    """PI-RADS-like category (2-5) of one lesion from explicit synthetic rules.

    * csPCa (``kind == "cancer"``): 5 if ``diameter_mm >= 15`` else 4.
    * benign mimics (glandular or stromal BPH nodule, inflammation, haemorrhage, cyst): 3 if
      ``adc_um2_per_s < 1100`` and DWI is marked (noise-free b=1400 lesion/background signal ratio
      ``dwi_contrast >= 2.0``), else 2. Stromal BPH (low ADC, marked DWI) is often 3; haemorrhage
      (low ADC but DWI not brighter than its background) is always 2, and so is a cyst (DWI bright by T2
      shine-through, but ADC high).

    Category 1 is the study-level category when there is no lesion.
    """
    if kind == "cancer":
        return 5 if diameter_mm >= PIRADS_5_DIAMETER_MM else 4
    if kind not in LESION_KINDS:
        raise ValueError(f"unknown lesion kind {kind!r}")
    marked = dwi_contrast >= PIRADS_DWI_MARKED_RATIO
    return 3 if (adc_um2_per_s < PIRADS_MIMIC_ADC_THRESHOLD and marked) else 2


def high_b_signal(tissue: Tissue, b_value: float = PIRADS_DWI_B_VALUE) -> float:
    """Noise-free DWI signal ``S0 * exp(-b * ADC)`` of ``tissue`` (ADC in 1e-6 mm^2/s)."""
    return tissue.s0 * math.exp(-b_value * tissue.adc * 1e-6)


def s0_for_dwi_contrast(
    adc_um2_per_s: float, background: Tissue, dwi_contrast: float, b_value: float = PIRADS_DWI_B_VALUE
) -> float:
    """The S0 (a.u.) that gives a tissue of ADC ``adc_um2_per_s`` (1e-6 mm^2/s) the noise-free high-b
    signal ratio ``dwi_contrast`` against ``background`` at ``b_value`` (s/mm^2)."""
    return dwi_contrast * high_b_signal(background, b_value) / math.exp(-b_value * adc_um2_per_s * 1e-6)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def rotation_matrix(axis: Sequence[float] | np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation about the unit vector ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def _u(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _texture(rng: np.random.Generator, n: int, wavelength_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(wavelength_mm[0], wavelength_mm[1], size=(n, 1))
    return (2 * np.pi * directions / wavelengths), rng.uniform(0, 2 * np.pi, size=n)


@dataclasses.dataclass(frozen=True)
class AnatomyRanges:
    """Sampling ranges of the anatomy and lesions. See docs/synthetic_studies.md ("Lesions").

    Lengths in mm, ADC in 1e-6 mm^2/s, ``*_t2_fraction`` = lesion T2 / its zone's T2 (before texture),
    ``*_dwi_contrast`` = noise-free b=1400 signal ratio lesion / zone tissue (the lesion's S0 is derived
    from it), probabilities are fractions.

    Lesion frequencies: ``p_no_lesion`` of the studies have none, ``p_cancer`` have 1-2 cancers
    (75 % / 25 %) plus a mimic with probability ``p_mimic_with_cancer``, the rest have 1-2 mimics
    (50 % / 50 %). A cancer lies in the TZ with probability ``p_cancer_in_tz``; a mimic's kind is drawn
    with ``mimic_weights`` (normalized) and lies in its kind's zone (:data:`LESION_ZONES`).
    """

    gland_lr_mm: tuple[float, float] = (35.0, 50.0)
    gland_ap_mm: tuple[float, float] = (28.0, 40.0)
    gland_si_mm: tuple[float, float] = (28.0, 38.0)
    gland_tilt_deg: tuple[float, float] = (-10.0, 10.0)
    pz_adc: tuple[float, float] = (1600.0, 2000.0)
    tz_adc: tuple[float, float] = (1200.0, 1500.0)
    #: PZ cancer ADC
    cancer_adc: tuple[float, float] = (600.0, 1000.0)
    #: TZ cancer ADC (overlaps stromal BPH: DWI/ADC are ambiguous in the TZ)
    tz_cancer_adc: tuple[float, float] = (650.0, 1050.0)
    #: PZ cancer T2 from clearly dark to nearly iso: T2 alone does not decide in the PZ
    pz_cancer_t2_fraction: tuple[float, float] = (0.35, 0.9)
    #: TZ cancer: homogeneous, moderately dark ("erased charcoal")
    tz_cancer_t2_fraction: tuple[float, float] = (0.55, 0.8)
    bph_glandular_adc: tuple[float, float] = (1150.0, 1600.0)
    bph_glandular_t2_fraction: tuple[float, float] = (1.15, 1.6)
    #: stromal BPH: the same T2 core darkness and overlapping ADC/DWI as a TZ cancer; rim, edge, texture differ
    bph_stromal_adc: tuple[float, float] = (750.0, 1100.0)
    bph_stromal_t2_fraction: tuple[float, float] = (0.55, 0.8)
    #: dark capsule of both BPH types, as a fraction of the TZ T2
    bph_rim_t2_fraction: tuple[float, float] = (0.3, 0.45)
    inflammation_adc: tuple[float, float] = (1000.0, 1400.0)
    inflammation_t2_fraction: tuple[float, float] = (0.55, 0.8)
    inflammation_dwi_contrast: tuple[float, float] = (1.2, 1.9)
    #: haemorrhage: ADC in the cancer range, very dark T2, high-b DWI at or below the background
    haemorrhage_adc: tuple[float, float] = (700.0, 1100.0)
    haemorrhage_t2_fraction: tuple[float, float] = (0.15, 0.3)
    haemorrhage_dwi_contrast: tuple[float, float] = (0.7, 1.0)
    #: cyst (version 3): fluid T2 (a.u., PZ 750-950, TZ ~460), high ADC, high-b DWI bright by T2 shine-through
    cyst_t2: tuple[float, float] = (1300.0, 1800.0)
    cyst_adc: tuple[float, float] = (1700.0, 2200.0)
    cyst_dwi_contrast: tuple[float, float] = (1.4, 2.6)
    cyst_diameter_mm: tuple[float, float] = (5.0, 12.0)
    #: probability of one incidental cyst in a study that has lesions (:func:`add_incidental_cyst`)
    p_cyst: float = 0.2
    p_cyst_in_tz: float = 0.5
    lesion_diameter_mm: tuple[float, float] = (5.0, 25.0)
    p_no_lesion: float = 0.35
    p_cancer: float = 0.40
    p_cancer_in_tz: float = 0.3
    p_mimic_with_cancer: float = 0.5
    mimic_weights: tuple[tuple[str, float], ...] = (
        ("bph_nodule", 0.3),
        ("bph_stromal", 0.25),
        ("inflammation", 0.25),
        ("haemorrhage", 0.2),
    )
    max_lesions: int = 3


def sample_anatomy(rng: np.random.Generator, center_lps_mm: np.ndarray, ranges: AnatomyRanges) -> Anatomy:
    """Draw a pelvis with a gland centred at ``center_lps_mm`` and 0..``max_lesions`` lesions."""
    c = np.asarray(center_lps_mm, dtype=np.float64)
    semi = np.array([_u(rng, ranges.gland_lr_mm), _u(rng, ranges.gland_ap_mm), _u(rng, ranges.gland_si_mm)]) / 2
    tilt = math.radians(_u(rng, ranges.gland_tilt_deg))
    yaw = math.radians(rng.uniform(-4, 4))
    rot = rotation_matrix((0, 0, 1), yaw) @ rotation_matrix((1, 0, 0), tilt)
    gland = Shape(c, semi, rot)
    tz_semi = semi * np.array([rng.uniform(0.55, 0.72), rng.uniform(0.5, 0.62), rng.uniform(0.6, 0.75)])
    tz_center = c + rot @ (semi * np.array([0.0, -0.2, 0.15]))
    tz = Shape(tz_center, tz_semi, rot)

    def jitter(v: float, rel: float = 0.1) -> float:
        return float(v * rng.uniform(1 - rel, 1 + rel))

    pz_t2 = rng.uniform(750, 950)
    tissues = {
        "air": Tissue(3.0, 2.0, 0.0),
        "fat": Tissue(jitter(900), jitter(60), jitter(500)),
        "muscle": Tissue(jitter(250), jitter(300), jitter(1450)),
        "bone": Tissue(jitter(550), jitter(80), jitter(400)),
        "cortex": Tissue(jitter(80), jitter(40), jitter(400)),
        "rectal_wall": Tissue(jitter(320), jitter(320), jitter(1300)),
        "rectal_gas": Tissue(15.0, 10.0, 1000.0),
        "rectal_fluid": Tissue(jitter(1200), jitter(900), jitter(2800)),
        "urine": Tissue(jitter(1500), jitter(1300), jitter(2950, 0.05)),
        "bladder_wall": Tissue(jitter(300), jitter(300), jitter(1500)),
        "capsule": Tissue(jitter(350), jitter(350), jitter(1500)),
        "pz": Tissue(float(pz_t2), jitter(720), _u(rng, ranges.pz_adc)),
        "tz": Tissue(jitter(460), jitter(550), _u(rng, ranges.tz_adc)),
        "afms": Tissue(jitter(230), jitter(300), jitter(1250)),
    }
    ey, ez = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
    eye = np.eye(3)
    body_semi = np.array([rng.uniform(150, 180), rng.uniform(100, 125), 1.0])
    body_c = c + np.array([0.0, -rng.uniform(10, 30), 0.0])
    fat_mm = rng.uniform(12, 30)
    cavity = Shape(c + np.array([0, 5, 10]), np.array([rng.uniform(55, 65), rng.uniform(42, 50), 90.0]), eye)
    obt_dx = semi[0] + rng.uniform(14, 22)
    structures: list[tuple[str, Shape]] = [
        ("fat", Shape(body_c, body_semi, eye, cylinder=True)),
        ("muscle", Shape(body_c, body_semi - np.array([fat_mm, fat_mm, 0]), eye, cylinder=True)),
        ("fat", cavity),
    ]
    for side in (-1.0, 1.0):
        obt_rot = rotation_matrix(ey, side * math.radians(rng.uniform(5, 15)))
        structures.append(
            ("muscle", Shape(c + np.array([side * obt_dx, 0, 5]), np.array([8.0, 32.0, 45.0]) * jitter(1.0), obt_rot))
        )
        femur_c = c + np.array([side * (semi[0] + rng.uniform(55, 65)), rng.uniform(-10, 0), rng.uniform(15, 25)])
        structures.append(("cortex", Shape(femur_c, np.full(3, 25.0), eye)))
        structures.append(("bone", Shape(femur_c, np.full(3, 22.0), eye)))
    pubis_c = c + np.array([0.0, -(semi[1] + rng.uniform(12, 20)), rng.uniform(10, 20)])
    structures.append(("cortex", Shape(pubis_c, np.array([22.0, 9.0, 22.0]), eye)))
    structures.append(("bone", Shape(pubis_c, np.array([19.0, 6.0, 19.0]), eye)))
    rect_semi = np.array([rng.uniform(15, 21), rng.uniform(10, 15), 1.0])
    rect_c = c + np.array([rng.uniform(-4, 4), semi[1] + rng.uniform(2, 5) + rect_semi[1], 0.0])
    rect_rot = rotation_matrix((1, 0, 0), math.radians(rng.uniform(-20, 5)))
    structures.append(("rectal_wall", Shape(rect_c, rect_semi, rect_rot, cylinder=True)))
    lumen = "rectal_gas" if rng.random() < 0.6 else "rectal_fluid"
    structures.append((lumen, Shape(rect_c, rect_semi - np.array([3.0, 3.0, 0]), rect_rot, cylinder=True)))
    bl_semi = np.array([rng.uniform(30, 45), rng.uniform(25, 35), rng.uniform(20, 30)])
    bl_c = c + rot @ np.array([0.0, -0.3 * semi[1], semi[2]]) + ez * (bl_semi[2] * rng.uniform(0.85, 1.0))
    structures.append(("bladder_wall", Shape(bl_c, bl_semi, eye)))
    structures.append(("urine", Shape(bl_c, bl_semi - 3.0, eye)))
    textures = {
        "tz": _texture(rng, 6, (4.0, 12.0)),
        "pz": _texture(rng, 4, (6.0, 15.0)),
        "lesion": _texture(rng, 4, (2.5, 6.0)),
    }
    anatomy = Anatomy(gland, tz, float(rng.uniform(0.45, 0.6)), tissues, tuple(structures), textures, ())
    return dataclasses.replace(anatomy, lesions=_sample_lesions(rng, anatomy, ranges))


def _sample_lesions(rng: np.random.Generator, anatomy: Anatomy, ranges: AnatomyRanges) -> tuple[Lesion, ...]:
    u = rng.random()
    if u < ranges.p_no_lesion:
        return ()
    names = [name for name, _ in ranges.mimic_weights]
    if not set(names) <= set(MIMIC_KINDS):
        raise ValueError(f"mimic_weights names {names} must be among {MIMIC_KINDS}")
    weights = np.array([w for _, w in ranges.mimic_weights], dtype=np.float64)
    weights /= weights.sum()

    def mimics(n: int) -> list[str]:
        return [names[int(rng.choice(len(names), p=weights))] for _ in range(n)]

    kinds: list[str]
    if u < ranges.p_no_lesion + ranges.p_cancer:
        kinds = ["cancer"] * int(rng.choice([1, 1, 1, 2]))
        kinds += mimics(int(rng.random() < ranges.p_mimic_with_cancer))
    else:
        kinds = mimics(int(rng.choice([1, 2])))
    kinds = kinds[: ranges.max_lesions]
    lesions: list[Lesion] = []
    for kind in kinds:
        for _attempt in range(50):
            lesion = _sample_lesion(rng, anatomy, ranges, kind)
            if lesion is None:
                continue
            if all(_separated(lesion, other) for other in lesions):
                lesions.append(lesion)
                break
    return tuple(lesions)


def add_incidental_cyst(rng: np.random.Generator, anatomy: Anatomy, ranges: AnatomyRanges) -> Anatomy:
    """``anatomy`` plus, with probability ``p_cyst`` when it has lesions, one cyst (T2 shine-through mimic).

    Only studies that already have lesions get one, so the study-level split (no lesion / cancer / mimics
    only) and the other kinds' frequencies stay those of :func:`sample_anatomy`; ``max_lesions`` does not
    count it. Drawn from its own ``rng`` so the rest of the study does not depend on it.
    """
    draw = rng.random()
    if not anatomy.lesions or draw >= ranges.p_cyst:
        return anatomy
    for _attempt in range(50):
        cyst = _sample_lesion(rng, anatomy, ranges, "cyst")
        if cyst is not None and all(_separated(cyst, other) for other in anatomy.lesions):
            return dataclasses.replace(anatomy, lesions=(*anatomy.lesions, cyst))
    return anatomy


def _separated(a: Lesion, b: Lesion, gap_mm: float = 2.0) -> bool:
    d = float(np.linalg.norm(a.shape.center_lps_mm - b.shape.center_lps_mm))
    return d > 1.15 * (a.diameter_mm + b.diameter_mm) / 2 + gap_mm


def _sample_lesion(rng: np.random.Generator, anatomy: Anatomy, ranges: AnatomyRanges, kind: str) -> Lesion | None:
    """One lesion of ``kind`` with the PI-RADS v2.1 appearance of its zone (docs/synthetic_studies.md)."""
    if kind not in LESION_KINDS:
        raise ValueError(f"unknown lesion kind {kind!r}")
    gl = anatomy.gland
    zone = LESION_ZONES[kind][0]  # "pz" for cancer
    if kind == "cancer" and rng.random() < ranges.p_cancer_in_tz:
        zone = "tz"
    if kind == "cyst" and rng.random() < ranges.p_cyst_in_tz:
        zone = "tz"
    zone_code = ZONE_TZ if zone == "tz" else ZONE_PZ
    # centre: uniform in the inner gland, accepted in the requested zone
    for _ in range(100):
        q = rng.uniform(-1, 1, size=3)
        if np.sum(q**2) > 0.75**2:
            continue
        center = gl.center_lps_mm + gl.rotation @ (q * gl.semi_axes_mm)
        if int(anatomy.zone_at(center)) == zone_code:
            break
    else:
        return None
    d_max = min(ranges.lesion_diameter_mm[1], 1.6 * float(np.min(gl.semi_axes_mm)))
    lo = ranges.lesion_diameter_mm[0]
    # small lesions are more frequent than large ones
    diameter = lo + (d_max - lo) * float(rng.beta(1.3, 2.0))
    background = anatomy.tissues[zone]
    random_rot = rotation_matrix(rng.normal(size=3), rng.uniform(0, np.pi))
    rim: float | None = None
    if kind == "cancer" and zone == "pz":
        # judged on DWI/ADC: low ADC, marked DWI; T2 from clearly dark to nearly iso
        ratios = np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
        rng.shuffle(ratios)
        semi, rot = diameter / 2 * ratios, random_rot
        t2 = background.t2 * _u(rng, ranges.pz_cancer_t2_fraction)
        tissue = Tissue(t2, _u(rng, (450, 650)), _u(rng, ranges.cancer_adc))
        edge, bumps, tex = _u(rng, (0.5, 1.0)), tuple(rng.uniform(-0.15, 0.15, size=4)), 0.05
    elif kind == "cancer":
        # TZ, judged on T2W: homogeneous moderately dark, lenticular, ill-defined ("erased charcoal"), no capsule
        ratios = np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.4, 0.6)])
        semi, rot = diameter / 2 * ratios, random_rot
        t2 = background.t2 * _u(rng, ranges.tz_cancer_t2_fraction)
        tissue = Tissue(t2, _u(rng, (450, 650)), _u(rng, ranges.tz_cancer_adc))
        edge = max(0.8, min(_u(rng, (1.2, 2.2)), 0.35 * float(np.mean(semi))))
        bumps, tex = tuple(rng.uniform(-0.15, 0.15, size=4)), 0.03
    elif kind == "cyst":
        # retention cyst / cystic BPH: round, sharp, homogeneous fluid; bright on high-b by T2 shine-through
        diameter = _u(rng, (ranges.cyst_diameter_mm[0], min(ranges.cyst_diameter_mm[1], d_max)))
        semi = diameter / 2 * np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0)])
        rot = random_rot
        adc_value = _u(rng, ranges.cyst_adc)
        s0_value = s0_for_dwi_contrast(adc_value, background, _u(rng, ranges.cyst_dwi_contrast))
        tissue = Tissue(_u(rng, ranges.cyst_t2), s0_value, adc_value)
        edge, bumps, tex = 0.3, tuple(rng.uniform(-0.03, 0.03, size=4)), 0.02
    elif kind in ("bph_nodule", "bph_stromal"):
        # round, encapsulated (dark rim), sharp edge, heterogeneous; glandular bright, stromal dark
        semi = diameter / 2 * np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0)])
        rot = random_rot
        if kind == "bph_nodule":
            t2_fraction, adc, s0 = ranges.bph_glandular_t2_fraction, ranges.bph_glandular_adc, (500.0, 700.0)
        else:
            t2_fraction, adc, s0 = ranges.bph_stromal_t2_fraction, ranges.bph_stromal_adc, (500.0, 700.0)
        tissue = Tissue(background.t2 * _u(rng, t2_fraction), _u(rng, s0), _u(rng, adc))
        rim = background.t2 * _u(rng, ranges.bph_rim_t2_fraction)
        edge, bumps, tex = 0.4, tuple(rng.uniform(-0.05, 0.05, size=4)), 0.22
    elif kind == "inflammation":
        # band-like along the PZ crescent, ill-defined; ADC mildly reduced, DWI only mildly bright
        semi = diameter / 2 * np.array([1.0, rng.uniform(0.3, 0.5), rng.uniform(0.6, 0.9)])
        semi = np.maximum(semi, 2.5)
        local = (center - gl.center_lps_mm) @ gl.rotation
        angle = -0.8 * math.atan2(local[0], max(local[1], 1.0) + gl.semi_axes_mm[1])
        rot = gl.rotation @ rotation_matrix((0, 0, 1), angle)
        adc_value = _u(rng, ranges.inflammation_adc)
        s0_value = s0_for_dwi_contrast(adc_value, background, _u(rng, ranges.inflammation_dwi_contrast))
        tissue = Tissue(background.t2 * _u(rng, ranges.inflammation_t2_fraction), s0_value, adc_value)
        edge, bumps, tex = _u(rng, (1.8, 3.0)), tuple(rng.uniform(-0.2, 0.2, size=4)), 0.1
    else:  # haemorrhage: very dark T2, low ADC, but low S0 (susceptibility): high-b DWI not bright
        ratios = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9)])
        rng.shuffle(ratios)
        semi, rot = diameter / 2 * ratios, random_rot
        adc_value = _u(rng, ranges.haemorrhage_adc)
        s0_value = s0_for_dwi_contrast(adc_value, background, _u(rng, ranges.haemorrhage_dwi_contrast))
        tissue = Tissue(background.t2 * _u(rng, ranges.haemorrhage_t2_fraction), s0_value, adc_value)
        edge, bumps, tex = _u(rng, (0.8, 1.5)), tuple(rng.uniform(-0.2, 0.2, size=4)), 0.1
    contrast = high_b_signal(tissue) / high_b_signal(background)
    significant = kind == "cancer"
    shape = Shape(center, np.asarray(semi, dtype=np.float64), rot)
    diameter_mm = float(2 * np.max(semi))
    pirads = pirads_category(kind, diameter_mm, tissue.adc, contrast)
    return Lesion(kind, zone, shape, tissue, rim, float(edge), bumps, tex, significant, float(contrast), pirads)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
Block = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (k0,k1),(j0,j1),(i0,i1)


def full_block(geom: GridGeometry) -> Block:
    ni, nj, nk = geom.size_ijk
    return ((0, nk), (0, nj), (0, ni))


def shape_block(geom: GridGeometry, shape: Shape, margin_mm: float = 2.0) -> Block | None:
    """Index bounding block of ``shape`` (+margin) on ``geom``; None when it misses the grid."""
    d = geom.direction_matrix
    lo_hi = []
    for axis in range(3):  # (i, j, k)
        ext = shape.half_extent_mm(d[:, axis]) + margin_mm
        centre_idx = float(geom.lps_to_index(shape.center_lps_mm)[2 - axis])
        half = ext / geom.spacing_mm_ijk[axis]
        lo = max(int(math.floor(centre_idx - half)), 0)
        hi = min(int(math.ceil(centre_idx + half)) + 1, geom.size_ijk[axis])
        if hi <= lo:
            return None
        lo_hi.append((lo, hi))
    return (lo_hi[2], lo_hi[1], lo_hi[0])


def local_coords(
    geom: GridGeometry,
    block: Block,
    center_lps_mm: np.ndarray,
    rotation: np.ndarray,
    scale: np.ndarray | None = None,
    components: Sequence[int] = (0, 1, 2),
) -> list[np.ndarray]:
    """Local coordinates ``rotation^T (p - center) / scale`` of the voxels of ``block`` (float32 ``(d,h,w)``).

    The mapping index -> local coordinate is affine, so each component is the sum of three
    broadcast 1-D terms (one full-size operation per component).
    """
    s = np.ones(3) if scale is None else np.asarray(scale, dtype=np.float64)
    m = (rotation.T @ geom.direction_matrix * np.asarray(geom.spacing_mm_ijk)) / s[:, None]
    t = rotation.T @ (np.asarray(geom.origin_lps_mm) - center_lps_mm) / s
    (k0, k1), (j0, j1), (i0, i1) = block
    k = np.arange(k0, k1, dtype=np.float64)
    j = np.arange(j0, j1, dtype=np.float64)
    i = np.arange(i0, i1, dtype=np.float64)
    out = []
    for c in components:
        kk = (t[c] + m[c, 2] * k).astype(F32)[:, None, None]
        jj = (m[c, 1] * j).astype(F32)[None, :, None]
        ii = (m[c, 0] * i).astype(F32)[None, None, :]
        out.append((kk + jj) + ii)
    return out


def _radius2(geom: GridGeometry, block: Block, shape: Shape) -> np.ndarray:
    comps = (0, 1) if shape.cylinder else (0, 1, 2)
    q = local_coords(geom, block, shape.center_lps_mm, shape.rotation, shape.semi_axes_mm, comps)
    r2 = q[0] * q[0]
    for extra in q[1:]:
        r2 += extra * extra
    return r2


def _texture_field(q: list[np.ndarray], waves: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Smooth random field with unit variance from plane waves; ``q`` in mm (LPS-aligned)."""
    vectors, phases = waves
    field = np.zeros(q[0].shape, dtype=F32)
    for v, ph in zip(vectors, phases, strict=True):
        field += np.cos(q[0] * F32(v[0]) + q[1] * F32(v[1]) + q[2] * F32(v[2]) + F32(ph))
    field *= F32(math.sqrt(2.0 / len(phases)))
    return field


@dataclasses.dataclass
class TissueMaps:
    """Noise-free property maps on one grid, float32 ``(D, H, W)``; ``None`` for fields not rendered."""

    t2: np.ndarray | None
    s0: np.ndarray | None
    adc: np.ndarray | None


FIELDS = ("t2", "s0", "adc")


def render(anatomy: Anatomy, geom: GridGeometry, fields: Sequence[str] = FIELDS) -> TissueMaps:
    """Render the anatomy's tissue properties on every voxel centre of ``geom``."""
    ni, nj, nk = geom.size_ijk
    air = anatomy.tissues["air"]
    maps = {f: np.full((nk, nj, ni), getattr(air, f), dtype=F32) for f in fields}
    full = full_block(geom)
    for name, shape in anatomy.structures:
        block = shape_block(geom, shape) if not shape.cylinder else full
        if block is None:
            continue
        inside = _radius2(geom, block, shape) <= 1.0
        sl = _slices(block)
        tissue = anatomy.tissues[name]
        for f in fields:
            np.copyto(maps[f][sl], F32(getattr(tissue, f)), where=inside)
    _render_gland(anatomy, geom, maps, fields)
    return TissueMaps(maps.get("t2"), maps.get("s0"), maps.get("adc"))


def _slices(block: Block) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in block)  # type: ignore[return-value]


def _render_gland(anatomy: Anatomy, geom: GridGeometry, maps: dict[str, np.ndarray], fields: Sequence[str]) -> None:
    gl = anatomy.gland
    block = shape_block(geom, gl, margin_mm=1.0)
    if block is None:
        return
    sl = _slices(block)
    t = anatomy.tissues
    q = local_coords(geom, block, gl.center_lps_mm, gl.rotation, gl.semi_axes_mm)
    r2 = q[0] * q[0] + q[1] * q[1] + q[2] * q[2]
    inside = r2 <= 1.0
    capsule = inside & (r2 > 0.93**2)
    r2_tz = _radius2(geom, block, anatomy.tz)
    in_tz = (r2_tz <= 1.0) & ~capsule & inside
    afms = inside & ~capsule & ~in_tz & (q[1] < -anatomy.afms_fraction) & (np.abs(q[0]) < 0.6)
    in_pz = inside & ~capsule & ~in_tz & ~afms
    q_mm = local_coords(geom, block, gl.center_lps_mm, np.eye(3))
    tex_tz = _texture_field(q_mm, anatomy.textures["tz"])
    tex_pz = _texture_field(q_mm, anatomy.textures["pz"])
    rel = {"t2": (0.06, 0.18), "s0": (0.04, 0.1), "adc": (0.03, 0.05)}
    for f in fields:
        m = maps[f][sl]
        np.copyto(m, F32(getattr(t["capsule"], f)), where=capsule)
        np.copyto(m, F32(getattr(t["afms"], f)), where=afms)
        rel_pz, rel_tz = rel[f]
        pz_val = F32(getattr(t["pz"], f)) * (F32(1) + F32(rel_pz) * tex_pz)
        tz_val = F32(getattr(t["tz"], f)) * (F32(1) + F32(rel_tz) * tex_tz)
        np.copyto(m, pz_val, where=in_pz)
        np.copyto(m, tz_val, where=in_tz)
    for lesion in anatomy.lesions:
        _render_lesion(anatomy, geom, lesion, maps, fields)


def lesion_weight(anatomy: Anatomy, geom: GridGeometry, lesion: Lesion) -> tuple[Block, np.ndarray, np.ndarray] | None:
    """Soft membership ``w`` in [0, 1] (0.5 at the lesion border, clipped to the gland) on a block.

    Returns ``(block, w, r_eff)`` where ``r_eff`` is the irregular normalized radius (border at 1).
    """
    margin = 3.0 * lesion.edge_mm + 0.3 * lesion.diameter_mm
    block = shape_block(geom, lesion.shape, margin_mm=margin)
    if block is None:
        return None
    sh = lesion.shape
    q = local_coords(geom, block, sh.center_lps_mm, sh.rotation, sh.semi_axes_mm)
    r = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) + F32(1e-6)
    b = lesion.bumps
    nx, ny, nz = q[0] / r, q[1] / r, q[2] / r
    bump = F32(1) + F32(b[0]) * nx * ny * F32(2) + F32(b[1]) * ny * nz * F32(2) + F32(b[2]) * (nx * nx - nz * nz)
    bump += F32(b[3]) * (F32(3) * nz * nz - F32(1)) * F32(0.5)
    r_eff = r / bump
    radius_mm = float(np.mean(sh.semi_axes_mm))
    w = F32(1) / (F32(1) + np.exp((r_eff - F32(1)) * F32(radius_mm / lesion.edge_mm)))
    g = local_coords(geom, block, anatomy.gland.center_lps_mm, anatomy.gland.rotation, anatomy.gland.semi_axes_mm)
    in_gland = (g[0] * g[0] + g[1] * g[1] + g[2] * g[2]) <= F32(0.93**2)
    w *= in_gland
    return block, w, r_eff


def _render_lesion(
    anatomy: Anatomy, geom: GridGeometry, lesion: Lesion, maps: dict[str, np.ndarray], fields: Sequence[str]
) -> None:
    res = lesion_weight(anatomy, geom, lesion)
    if res is None:
        return
    block, w, r_eff = res
    sl = _slices(block)
    q_mm = local_coords(geom, block, lesion.shape.center_lps_mm, np.eye(3))
    tex = _texture_field(q_mm, anatomy.textures["lesion"])
    for f in fields:
        m = maps[f][sl]
        value = np.full(w.shape, getattr(lesion.tissue, f), dtype=F32)
        if f == "t2":
            value *= F32(1) + F32(lesion.texture_t2) * tex
            if lesion.rim_t2 is not None:
                rim = F32(1) / (F32(1) + np.exp(-(r_eff - F32(0.78)) * F32(12.0)))
                value += (F32(lesion.rim_t2) - value) * rim
        elif f == "adc":
            value *= F32(1) + F32(0.03) * tex
        m += (value - m) * w


def lesion_label_map(anatomy: Anatomy, geom: GridGeometry) -> np.ndarray:
    """uint8 ``(D, H, W)`` label volume on ``geom``: 0 background, ``i`` = ``anatomy.lesions[i-1]``."""
    ni, nj, nk = geom.size_ijk
    label = np.zeros((nk, nj, ni), dtype=np.uint8)
    for idx, lesion in enumerate(anatomy.lesions, start=1):
        res = lesion_weight(anatomy, geom, lesion)
        if res is None:
            continue
        block, w, _ = res
        label[_slices(block)][w >= 0.5] = idx
    return label


def zone_map(anatomy: Anatomy, geom: GridGeometry) -> np.ndarray:
    """uint8 ``(D, H, W)`` zone codes (ZONE_*) on ``geom`` (voxel centres; same rule as ``Anatomy.zone_at``)."""
    ni, nj, nk = geom.size_ijk
    zone = np.zeros((nk, nj, ni), dtype=np.uint8)
    gl = anatomy.gland
    block = shape_block(geom, gl, margin_mm=1.0)
    if block is None:
        return zone
    q = local_coords(geom, block, gl.center_lps_mm, gl.rotation, gl.semi_axes_mm)
    inside = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) <= 1.0
    in_tz = _radius2(geom, block, anatomy.tz) <= 1.0
    afms = (q[1] < -anatomy.afms_fraction) & (np.abs(q[0]) < 0.6)
    sub = np.full(inside.shape, ZONE_PZ, dtype=np.uint8)
    sub[afms] = ZONE_AFMS
    sub[in_tz] = ZONE_TZ
    sub[~inside] = ZONE_OUTSIDE
    zone[_slices(block)] = sub
    return zone
