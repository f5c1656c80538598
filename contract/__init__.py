"""The one source of truth shared by preprocessing, training, export, the model repository and the service.

Everything that must agree between training and serving lives here: the sequence order, the model
grid, normalization constants, tensor names, shapes and data types. Nothing else in the code base
may hard-code these values (no train/serve skew).

Conventions
-----------
* Arrays are ``[B, S, D, H, W]`` (batch, sequence, slice, row, column); without batch ``[S, D, H, W]``.
* Physical coordinates are DICOM patient coordinates (LPS) in millimetres.
* Index order of a volume array is ``(k, j, i)`` = ``(D, H, W)``; SimpleITK / ITK index order is
  ``(i, j, k)``. :class:`GridGeometry` converts between voxel indices and LPS millimetres.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

#: version of the mpmri-serve code (recorded in checkpoints and manifests)
__version__ = "0.1.0"

#: "2": the classification model scores every voxel (``cspca_map``, ``score_map``) and the map fusion reads the
#: images (per-voxel fusion weights); "1" had study-level heads only. How candidates are extracted is recorded
#: with the model too (:class:`CandidateSettings`) and checked, but does not change the tensors (no new version).
CONTRACT_VERSION = "2"

# --------------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------------
#: Channel order of every image tensor ``[.., S, ..]``. T2W is required; ADC and DWI may be missing.
SEQUENCES: tuple[str, ...] = ("t2w", "adc", "dwi")
NUM_SEQUENCES: int = len(SEQUENCES)
REQUIRED_SEQUENCES: tuple[str, ...] = ("t2w",)
#: Minimum b-value (s/mm^2) accepted as "high-b" DWI.
MIN_HIGH_B_VALUE_S_PER_MM2: float = 800.0


def sequence_index(name: str) -> int:
    """Channel index of ``name`` in :data:`SEQUENCES`."""
    return SEQUENCES.index(name)


# --------------------------------------------------------------------------------------------------
# Model grid (geometric harmonization)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The model grid: a box centred on the T2W field of view, aligned with T2W's orientation.

    Attributes:
        size_dhw: number of voxels ``(D, H, W)``.
        spacing_mm_dhw: voxel spacing in mm ``(slice, row, column)``.
    """

    size_dhw: tuple[int, int, int] = (16, 64, 64)
    spacing_mm_dhw: tuple[float, float, float] = (3.0, 1.5, 1.5)

    @property
    def extent_mm_dhw(self) -> tuple[float, float, float]:
        """Physical extent of the grid in mm ``(slice, row, column)``."""
        return tuple(n * s for n, s in zip(self.size_dhw, self.spacing_mm_dhw))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"size_dhw": list(self.size_dhw), "spacing_mm_dhw": list(self.spacing_mm_dhw)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridSpec:
        return cls(size_dhw=tuple(d["size_dhw"]), spacing_mm_dhw=tuple(d["spacing_mm_dhw"]))  # type: ignore[arg-type]


DEFAULT_GRID = GridSpec()
#: The grid of deployed GPU models: about 3.0 x 0.5 x 0.5 mm over 24 x 256 x 256 voxels (PI-CAI baselines).
#: A model trained on it records it in its contract (``contract_dict(REALISTIC_GRID)``).
REALISTIC_GRID = GridSpec(size_dhw=(24, 256, 256), spacing_mm_dhw=(3.0, 0.5, 0.5))
#: A finer grid for the CPU profile: the default grid's 96 mm field of view at 1.0 mm in-plane (2.25 times the
#: voxels). Measured, not shipped: it did not help the transition zone (docs/networks.md, "The classification
#: network follows the fused map").
FINE_GRID = GridSpec(size_dhw=(16, 96, 96), spacing_mm_dhw=(3.0, 1.0, 1.0))
#: the grids training can be asked for by name (``mpmri train --grid``)
NAMED_GRIDS: dict[str, GridSpec] = {"default": DEFAULT_GRID, "fine": FINE_GRID, "realistic": REALISTIC_GRID}


@dataclasses.dataclass(frozen=True)
class GridGeometry:
    """Geometry of one concrete grid instance in patient space (LPS mm).

    Attributes:
        origin_lps_mm: LPS position of the centre of voxel ``(0, 0, 0)``.
        direction: 3x3 direction cosines, row-major like ITK: column ``c`` is the LPS unit vector of
            ITK axis ``c`` (axis 0 = i = W, axis 1 = j = H, axis 2 = k = D).
        spacing_mm_ijk: spacing along ITK axes ``(i, j, k)`` = ``(W, H, D)`` in mm.
        size_ijk: voxel counts along ``(i, j, k)``.
    """

    origin_lps_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major (ITK GetDirection order)
    spacing_mm_ijk: tuple[float, float, float]
    size_ijk: tuple[int, int, int]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_lps(self, index_kji: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous voxel index ``(k, j, i)`` (array order D, H, W) -> LPS mm. Accepts ``[..., 3]``."""
        idx = np.asarray(index_kji, dtype=np.float64)[..., ::-1]  # -> (i, j, k)
        scaled = idx * np.asarray(self.spacing_mm_ijk)
        return np.asarray(self.origin_lps_mm) + scaled @ self.direction_matrix.T

    def lps_to_index(self, point_lps_mm: Sequence[float] | np.ndarray) -> np.ndarray:
        """LPS mm -> continuous voxel index ``(k, j, i)`` (array order D, H, W). Accepts ``[..., 3]``."""
        p = np.asarray(point_lps_mm, dtype=np.float64) - np.asarray(self.origin_lps_mm)
        ijk = (p @ self.direction_matrix) / np.asarray(self.spacing_mm_ijk)
        return ijk[..., ::-1]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm_ijk))

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin_lps_mm": list(self.origin_lps_mm),
            "direction": list(self.direction),
            "spacing_mm_ijk": list(self.spacing_mm_ijk),
            "size_ijk": list(self.size_ijk),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridGeometry:
        return cls(
            origin_lps_mm=tuple(float(v) for v in d["origin_lps_mm"]),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in d["direction"]),
            spacing_mm_ijk=tuple(float(v) for v in d["spacing_mm_ijk"]),  # type: ignore[arg-type]
            size_ijk=tuple(int(v) for v in d["size_ijk"]),  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------------------------------
# Intensity harmonization
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PercentileNormalization:
    """Robust linear scaling: the ``lower``/``upper`` percentiles (inside the model grid) map to 0/1.

    Output is clipped to ``[clip_min, clip_max]`` to bound outliers.
    """

    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    clip_min: float = -0.5
    clip_max: float = 1.5
    kind: str = "percentile"


@dataclasses.dataclass(frozen=True)
class FixedScaleNormalization:
    """Fixed physical scaling for quantitative maps: ``x / divisor`` clipped to ``[clip_min, clip_max]``.

    For ADC the stored unit is 1e-6 mm^2/s, so ``divisor = 3000`` maps 3.0e-3 mm^2/s to 1.0.
    """

    divisor: float = 3000.0
    clip_min: float = 0.0
    clip_max: float = 1.5
    unit: str = "1e-6 mm^2/s"
    kind: str = "fixed_scale"


NormalizationSpec = PercentileNormalization | FixedScaleNormalization

#: Per-sequence intensity normalization, keyed by sequence name (same order as :data:`SEQUENCES`).
NORMALIZATION: dict[str, NormalizationSpec] = {
    "t2w": PercentileNormalization(),
    "adc": FixedScaleNormalization(),
    "dwi": PercentileNormalization(),
}

#: Value written into the channel of a sequence that is missing (its availability is 0).
MISSING_CHANNEL_FILL_VALUE: float = 0.0
#: Normalized value of grid voxels outside a sequence's field of view (no data there).
OUTSIDE_FOV_VALUE: float = 0.0


def normalization_to_dict() -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(NORMALIZATION[name]) for name in SEQUENCES}


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------
PIRADS_CATEGORIES: tuple[int, ...] = (1, 2, 3, 4, 5)
NUM_PIRADS: int = len(PIRADS_CATEGORIES)
#: Ordinal cut points of the continuous PI-RADS-like score ``s`` (``score_map``): the category of a score is
#: ``1 + #{c in PIRADS_SCORE_CUTPOINTS : s > c}`` (so 3.7 -> 4), and ``P(category >= k) = sigmoid((s - c_k) / tau)``.
PIRADS_SCORE_CUTPOINTS: tuple[float, ...] = (1.5, 2.5, 3.5, 4.5)
#: The category from which a lesion counts as clinically significant (synthetic rule: csPCa <=> PI-RADS >= 4).
CSPCA_MIN_PIRADS: int = 4


def pirads_category(score: float) -> int:
    """PI-RADS-like category 1-5 of a continuous score (``score_map`` units) by :data:`PIRADS_SCORE_CUTPOINTS`."""
    return PIRADS_CATEGORIES[0] + sum(1 for c in PIRADS_SCORE_CUTPOINTS if float(score) > c)


LABEL_DEFINITIONS: dict[str, str] = {
    "significant": "clinically significant prostate cancer (synthetic ground truth: lesion.significant)",
    "pirads": "PI-RADS-like category 1-5 (synthetic rules, docs/synthetic_studies.md)",
}


# --------------------------------------------------------------------------------------------------
# Serving tensors (Triton). Shapes exclude the batch dimension (Triton max_batch_size adds it).
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]  # without batch

    @property
    def triton_dtype(self) -> str:
        return {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}[self.dtype]

    @property
    def client_dtype(self) -> str:
        return {"float32": "FP32", "float16": "FP16", "int64": "INT64", "bool": "BOOL"}[self.dtype]


def tensor_specs(grid: GridSpec = DEFAULT_GRID) -> dict[str, TensorSpec]:
    """All named tensors of the serving graph for ``grid``."""
    d, h, w = grid.size_dhw
    s = NUM_SEQUENCES
    specs = [
        TensorSpec("images", "float32", (s, d, h, w)),
        TensorSpec("availability", "float32", (s,)),
        TensorSpec("sequence_maps", "float32", (s, d, h, w)),
        TensorSpec("fused_map", "float32", (1, d, h, w)),
        TensorSpec("cspca_probability", "float32", (1,)),
        TensorSpec("pirads_distribution", "float32", (NUM_PIRADS,)),
        TensorSpec("cspca_map", "float32", (1, d, h, w)),
        TensorSpec("score_map", "float32", (1, d, h, w)),
    ]
    return {t.name: t for t in specs}


#: Model names in the Triton repository and their input/output tensor names.
LOCALIZATION_MODEL = "localization"
FUSION_MODEL = "map_fusion"
CLASSIFICATION_MODEL = "classification"
ENSEMBLE_MODEL = "mpmri_ensemble"
MODEL_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    LOCALIZATION_MODEL: (("images",), ("sequence_maps",)),
    FUSION_MODEL: (("sequence_maps", "availability", "images"), ("fused_map",)),
    CLASSIFICATION_MODEL: (
        ("images", "fused_map"),
        ("cspca_probability", "pirads_distribution", "cspca_map", "score_map"),
    ),
    ENSEMBLE_MODEL: (
        ("images", "availability"),
        ("sequence_maps", "fused_map", "cspca_probability", "pirads_distribution", "cspca_map", "score_map"),
    ),
}


# --------------------------------------------------------------------------------------------------
# Lesion candidates (csPCa map -> lesions), shared by evaluation, the demo and the service
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CandidateSettings:
    """How lesion candidates are extracted from a likelihood map (PI-CAI ``extract_lesion_candidates``).

    Attributes:
        source_map: the ensemble output whose blobs are the candidates: ``fused_map``, the fused localization
            map (where the lesions are; under 1 % in normal tissue, so a blob is a localized finding).
        likelihood_map: the ensemble output that scores each candidate: ``cspca_map``, the calibrated csPCa
            probability per voxel; a candidate's likelihood is its peak inside the blob, and its PI-RADS-like
            category comes from ``score_map`` at the same voxels. Measured on validation seed 9101 with the
            same weights, blobs of ``cspca_map`` itself located 0.82 of the significant lesions with 4.7
            candidates per study; blobs of ``fused_map`` 0.90 with 0.9 (docs/networks.md).
        threshold: ``"dynamic"`` (PI-CAI default), ``"dynamic-fast"`` or a static likelihood threshold.
        min_voxels_detection: blobs with at most this many voxels are dropped. 0 keeps a one-voxel blob: a
            voxel of the default grid is 6.75 mm^3 (PI-CAI drops blobs of at most 10 voxels of 0.75 mm^3). Small
            transition-zone cancers (6-7 mm) often reach the floor in one or two voxels only (docs/networks.md).
        num_lesions_to_extract: maximum number of candidates per study.
        dynamic_threshold_factor: a blob extends down to ``peak / factor``.
        min_likelihood: candidates whose likelihood (from ``likelihood_map``) is at or below this are dropped.
        floor_likelihood: the lowest ``source_map`` value a candidate may peak at (the threshold and
            ``dynamic_threshold_factor`` apply to that map too). Without a floor the dynamic extraction grows
            background blobs of tens of millilitres wherever a map is a few per cent (and runs on the whole
            volume). A study without a ``source_map`` voxel at or above the floor has no candidate.
        floor_mode: how the floor applies. ``"peak"``: a blob must *peak* at or above the floor and extends
            by the threshold rule (``peak / factor`` for the dynamic one), so voxels below
            ``floor / factor`` join no candidate. ``"voxel"`` (releases 1-4 of contract 2): every voxel below
            the floor is set to 0 before the extraction, which cut a faint lesion's blob into fragments at the
            floor (extra false positives) or below ``min_voxels_detection`` (missed).
        secondary_sequence: a sequence whose own localization map (its channel of the ensemble output
            ``sequence_maps``) proposes further candidates outside the ``source_map`` ones, with the same
            extraction, floor and limit; ``None``: none. ``"dwi"``: in the transition zone the fusion leans on T2W
            (PI-RADS' zone logic: BPH nodules are DWI-bright too), so on small transition-zone cancers that only
            the DWI map sees the fused map stays below the floor; the lesion scorer, which reads every sequence in
            and around the blob, decides how suspicious they are (docs/networks.md, "Secondary candidates"). None
            are proposed when that sequence is absent from the study.
        secondary_exclusion_voxels: the ``source_map`` candidates grown by this many voxels (26-connected) are
            zeroed in the secondary map first, so that a secondary candidate is a new finding, not the rim of a
            primary one, and no two candidates touch (a PI-CAI detection map needs separate blobs).
        min_scored_likelihood: with a lesion scorer, candidates it scores below this are not reported as lesions
            (not in the findings, the SEG or the SR); the study probability is still the highest likelihood of
            all candidates. On validation seeds 9101-9103 (400 synthetic studies) such candidates were about 60 %
            of all and located no csPCa lesion; the lowest likelihood of a locating candidate was 0.17
            (docs/networks.md, "Secondary candidates").
        split_min_depth_logit: a blob holding several domes of the source map's log-odds is cut into one candidate
            per dome (a watershed of the log-odds, ``postprocessing.blob_split``); a dome must descend at least this
            far (in log-odds) to the saddle joining it to a higher one. ``None``: blobs are kept whole. Two lesions
            a few millimetres apart, or a cancer beside a BPH nodule, share one blob whose centroid lies between
            them; in log-odds the map has a valley there (e.g. +6.9, +0.4, +15.9).
        split_ceiling_logit: the log-odds are clipped here before the domes are sought, so a cut needs a saddle
            at most ``split_ceiling_logit - split_min_depth_logit`` (2: probability 0.88). Inside a large
            saturated lesion the map undulates at high log-odds (domes 3-6 deep over saddles above +3, probability
            0.95); without a ceiling a depth of 3 cut 7 such lesions of validation seeds 9101-9105 (800
            synthetic studies), moving their centres up to 5 mm from the lesion's. With depth 3 and ceilings 4-6
            (or depth 4, ceiling 8) exactly two studies change there: two csPCa lesions merged with a neighbour are
            located (365 of 376 against 363), nothing else moves (docs/networks.md, "Tenth release").
        min_region_mm3: a reported lesion's region (label map, PI-CAI detection map, SEG segment, volume) smaller
            than this is grown to it, one voxel at a time, 6-connected, the voxel of highest value of the map the
            candidate came from first, never touching another lesion. Its centre, likelihood and category are the
            blob's. Where a map answers a lesion with a narrow peak the blob is a few voxels (2-17, 13-115 mm^3)
            centred on a lesion of 7-13 mm, too small to overlap it by PI-CAI's IoU 0.1; 65 mm^3 is a sphere of
            5 mm, the smallest lesion reported (docs/networks.md, "Eleventh release"). ``None``: no growth.
    """

    source_map: str = "fused_map"
    likelihood_map: str = "cspca_map"
    threshold: str | float = "dynamic"
    min_voxels_detection: int = 0
    num_lesions_to_extract: int = 5
    dynamic_threshold_factor: float = 2.5
    min_likelihood: float = 0.0
    floor_likelihood: float = 0.05
    floor_mode: str = "peak"
    secondary_sequence: str | None = "dwi"
    secondary_exclusion_voxels: int = 1
    min_scored_likelihood: float = 0.05
    split_min_depth_logit: float | None = 3.0
    split_ceiling_logit: float = 5.0
    min_region_mm3: float | None = 65.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_CANDIDATES = CandidateSettings()


def contract_dict(grid: GridSpec = DEFAULT_GRID) -> dict[str, Any]:
    """Everything above as JSON-serializable data (recorded in checkpoints, meta.json and manifests)."""
    return {
        "contract_version": CONTRACT_VERSION,
        "sequences": list(SEQUENCES),
        "grid": grid.to_dict(),
        "normalization": normalization_to_dict(),
        "missing_channel_fill_value": MISSING_CHANNEL_FILL_VALUE,
        "pirads_categories": list(PIRADS_CATEGORIES),
        "pirads_score_cutpoints": list(PIRADS_SCORE_CUTPOINTS),
        "cspca_min_pirads": CSPCA_MIN_PIRADS,
        "labels": LABEL_DEFINITIONS,
        "candidates": DEFAULT_CANDIDATES.to_dict(),
    }


def contract_json(grid: GridSpec = DEFAULT_GRID) -> str:
    return json.dumps(contract_dict(grid), indent=2, sort_keys=True)


#: keys added to :func:`contract_dict` within the current contract version, with the value a recorded contract
#: that lacks them stands for (none since version 2, which made ``candidates`` required)
LEGACY_CONTRACT_DEFAULTS: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------------
# The served contract: what a deployed model expects, read back from its model repository
# --------------------------------------------------------------------------------------------------
#: contract versions this code can produce tensors for
SUPPORTED_CONTRACT_VERSIONS: tuple[str, ...] = (CONTRACT_VERSION,)


class ContractMismatchError(Exception):
    """A model's recorded contract asks for something this code cannot produce (names the difference)."""


def _normalization_from_dict(name: str, d: dict[str, Any]) -> NormalizationSpec:
    kinds: dict[str, type[PercentileNormalization] | type[FixedScaleNormalization]] = {
        "percentile": PercentileNormalization,
        "fixed_scale": FixedScaleNormalization,
    }
    kind = d.get("kind")
    if kind not in kinds:
        raise ContractMismatchError(f"normalization of {name}: unknown kind {kind!r} (supported: {sorted(kinds)})")
    cls = kinds[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ContractMismatchError(f"normalization of {name}: unknown parameters {unknown} for kind {kind!r}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ServedContract:
    """The part of a model's contract that preprocessing must honour (grid, sequences, normalization).

    Candidate settings are not honoured but checked: they must be the code's (:data:`DEFAULT_CANDIDATES`).
    """

    grid: GridSpec
    normalization: dict[str, NormalizationSpec]
    missing_channel_fill_value: float = MISSING_CHANNEL_FILL_VALUE
    contract_version: str = CONTRACT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServedContract:
        """Parse and check a recorded contract (:func:`contract_dict` layout).

        Raises:
            ContractMismatchError: a version, sequence set, grid or normalization this code cannot produce, or
                candidate settings other than the code's; the message names the field, what the model wants
                and what the code supports.
        """
        version = str(d.get("contract_version"))
        if version not in SUPPORTED_CONTRACT_VERSIONS:
            raise ContractMismatchError(
                f"contract_version {version!r} is not supported "
                f"(this code produces {list(SUPPORTED_CONTRACT_VERSIONS)})"
            )
        sequences = list(d.get("sequences") or [])
        if sequences != list(SEQUENCES):
            raise ContractMismatchError(
                f"sequences {sequences} differ from the ones this code produces {list(SEQUENCES)}"
            )
        try:
            grid = GridSpec.from_dict(d["grid"])
        except (KeyError, TypeError, ValueError) as err:
            raise ContractMismatchError(f"grid: missing or malformed ({err})") from None
        if len(grid.size_dhw) != 3 or any(int(n) < 2 for n in grid.size_dhw):
            raise ContractMismatchError(f"grid size_dhw {list(grid.size_dhw)}: need three sizes of at least 2")
        if len(grid.spacing_mm_dhw) != 3 or any(not float(v) > 0 for v in grid.spacing_mm_dhw):
            raise ContractMismatchError(
                f"grid spacing_mm_dhw {list(grid.spacing_mm_dhw)}: need three positive spacings"
            )
        grid = GridSpec(
            size_dhw=tuple(int(n) for n in grid.size_dhw),  # type: ignore[arg-type]
            spacing_mm_dhw=tuple(float(v) for v in grid.spacing_mm_dhw),  # type: ignore[arg-type]
        )
        norm_d = d.get("normalization") or {}
        missing = [s for s in SEQUENCES if s not in norm_d]
        if missing:
            raise ContractMismatchError(f"normalization: no entry for {missing}")
        normalization = {s: _normalization_from_dict(s, dict(norm_d[s])) for s in SEQUENCES}
        # the service extracts lesion candidates with the code's settings: a model recorded with others is refused
        recorded_candidates = d.get("candidates")
        if not isinstance(recorded_candidates, dict):
            raise ContractMismatchError(f"candidates: missing or malformed {recorded_candidates!r}")
        diffs = contract_differences(json.loads(json.dumps(recorded_candidates)), DEFAULT_CANDIDATES.to_dict())
        if diffs:
            raise ContractMismatchError(
                "candidate settings differ from the ones this code extracts lesions with: "
                + "; ".join(f"candidates.{line}" for line in diffs)
            )
        # per-lesion categories are read from score_map with the code's cut points
        for key, ours in (
            ("pirads_score_cutpoints", list(PIRADS_SCORE_CUTPOINTS)),
            ("cspca_min_pirads", CSPCA_MIN_PIRADS),
        ):
            if d.get(key) != ours:
                raise ContractMismatchError(
                    f"{key}: the model records {d.get(key)!r}, this code scores lesions with {ours!r}"
                )
        return cls(
            grid=grid,
            normalization=normalization,
            missing_channel_fill_value=float(d.get("missing_channel_fill_value", MISSING_CHANNEL_FILL_VALUE)),
            contract_version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> ServedContract:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ContractMismatchError(f"recorded contract is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise ContractMismatchError("recorded contract is not a JSON object")
        return cls.from_dict(data)


def contract_differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two contract dicts (``key: recorded -> current``)."""
    out: list[str] = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(contract_differences(a, b, path + "."))
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def recorded_contract_differences(recorded: dict[str, Any]) -> list[str]:
    """How a contract recorded with a model (a checkpoint) differs from what this code would record for it.

    The grid is the model's own (a model trained for another grid is fine: it is compared with
    ``contract_dict(recorded grid)``); everything else must equal the code's: contract version,
    sequences, normalization, missing-channel fill value, PI-RADS categories, label definitions and
    candidate settings. Keys of :data:`LEGACY_CONTRACT_DEFAULTS` absent from ``recorded`` count as
    recorded with those values.

    Returns:
        one ``key: recorded -> current`` line per difference (empty when the contract is the code's).
    """
    if not isinstance(recorded, dict) or not recorded:
        return ["contract: <absent> -> the code's contract (the checkpoint records none)"]
    try:
        grid = GridSpec.from_dict(recorded["grid"])
        current = contract_dict(grid)
    except (KeyError, TypeError, ValueError) as err:
        return [f"grid: missing or malformed ({err!r})"]
    filled = {**LEGACY_CONTRACT_DEFAULTS, **recorded}
    return contract_differences(json.loads(json.dumps(filled)), json.loads(json.dumps(current)))
