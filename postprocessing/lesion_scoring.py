"""Second-stage csPCa likelihood of each lesion candidate, from image and map features in and around its blob.

Torch-free (numpy + scipy), like the rest of postprocessing: the analysis service, the demo and evaluation call
the same :func:`candidate_features` and :meth:`LesionScorer.probability`, so they cannot differ.

Why a second stage: the classification network copies the fused map and barely reads the images
(docs/networks.md, "The classification network follows the fused map"). Yet simple statistics of the
preprocessed tensors inside and around a lesion separate transition-zone cancers from BPH nodules well
(docs/networks.md, "Candidate rescoring"). The scorer reads such statistics of each candidate
blob plus the network's own evidence (peak csPCa logit, highest score, fused-map peak, volume): a
small ensemble of gradient-boosted trees, fitted with the log-loss on studies the networks never trained on
(``training.lesion_scoring``), then recalibrated (study-level Platt, folded into the trees) on studies neither the
networks nor the scorer saw. Two more ensembles on the same features give each lesion its category: category 5
against 4 for a csPCa lesion, and "a lesion of any kind" against none below csPCa (:func:`coherent_category`;
docs/networks.md, "Ninth release"). It travels in the checkpoint (``metadata["lesion_scoring"]``) and in the model
repository (the ensemble's ``mpmri_lesion_scoring`` config parameter, which the service reads from Triton).

Missing sequences: every feature of an absent sequence is missing (NaN), which the trees route as fitted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from contract import CSPCA_MIN_PIRADS, PIRADS_CATEGORIES, SEQUENCES

#: the ensemble config parameter that carries the served lesion scorer (:meth:`LesionScorer.to_json`)
LESION_SCORING_PARAMETER = "mpmri_lesion_scoring"
#: a lesion at or above this csPCa likelihood is reported as category >= 4 (csPCa), below it as <= 3
CSPCA_LIKELIHOOD_THRESHOLD = 0.5
#: a csPCa lesion at or above this P(category 5 | csPCa) is reported as category 5, below it as 4
CATEGORY5_PROBABILITY_THRESHOLD = 0.5
#: below csPCa, a candidate at or above this P(a lesion of any kind) is category 2-3 (a benign lesion), below it 1
LESION_PROBABILITY_THRESHOLD = 0.5
#: features of the network's evidence in a blob
NETWORK_FEATURES: tuple[str, ...] = ("cspca_logit", "score_max", "fused_peak", "log_voxels")
#: statistics of each preprocessed sequence in a blob (``<sequence>_<name>``)
SEQUENCE_STATISTICS: tuple[str, ...] = (
    "mean",  # mean inside the blob
    "std",  # standard deviation inside the blob
    "ring_mean",  # mean over the ring of 2 voxels around the blob
    "ring_std",
    "contrast",  # mean - ring_mean
    "core_mean",  # mean over the blob eroded by one voxel (the blob itself when that is empty)
    "edge_gradient",  # mean in-plane gradient magnitude over the blob's outer voxel layer (per voxel)
    "min",
    "max",
)
#: the blob's extent along D, H, W in voxels
SHAPE_FEATURES: tuple[str, ...] = ("extent_d", "extent_h", "extent_w")
#: the peak of each sequence's own localization map in the blob (``sequence_maps``), and whether the blob is a
#: secondary candidate (1) or a fused-map one (0) (``CandidateSettings.secondary_sequence``)
MAP_FEATURES: tuple[str, ...] = tuple(f"{s}_map_peak" for s in SEQUENCES) + ("secondary",)
FEATURE_NAMES: tuple[str, ...] = (
    NETWORK_FEATURES + tuple(f"{s}_{n}" for s in SEQUENCES for n in SEQUENCE_STATISTICS) + SHAPE_FEATURES + MAP_FEATURES
)
_LOGIT_CLIP = 1e-6
_RING_VOXELS = 2
_MARGIN = _RING_VOXELS + 2


def _logit(p: float) -> float:
    q = min(max(float(p), _LOGIT_CLIP), 1.0 - _LOGIT_CLIP)
    return float(np.log(q / (1.0 - q)))


def candidate_features(
    images: np.ndarray,
    labels: np.ndarray,
    lesion_ids: Sequence[int],
    cspca_map: np.ndarray,
    score_map: np.ndarray,
    fused_map: np.ndarray,
    sequence_maps: np.ndarray,
    secondary: Sequence[bool],
) -> np.ndarray:
    """Feature vectors ``[N, len(FEATURE_NAMES)]`` float64 of the candidates ``lesion_ids`` (in that order).

    Args:
        images: the preprocessed study ``[S, D, H, W]`` (the tensor the ensemble read, contract order of sequences).
        labels: ``[D, H, W]`` integer label map of the candidates (candidate ``n`` -> ``n``, 0 background).
        lesion_ids: the candidates to describe (each must have at least one voxel in ``labels``).
        cspca_map, score_map, fused_map: the ensemble's maps ``[D, H, W]`` on the same grid.
        sequence_maps: the ensemble's per-sequence localization maps ``[S, D, H, W]``.
        secondary: per candidate of ``lesion_ids``, whether it is a secondary candidate
            (:func:`postprocessing.candidates.extract_study_candidates`).

    Raises:
        ValueError: the shapes disagree or a candidate has no voxel (names it).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[0] != len(SEQUENCES):
        raise ValueError(f"images must be [{len(SEQUENCES)}, D, H, W], got {images.shape}")
    shape = images.shape[1:]
    for name, volume in (
        ("labels", labels),
        ("cspca_map", cspca_map),
        ("score_map", score_map),
        ("fused_map", fused_map),
    ):
        if tuple(np.shape(volume)) != shape:
            raise ValueError(f"{name} has shape {np.shape(volume)}, images {shape}")
    maps = np.asarray(sequence_maps, dtype=np.float32)
    if maps.shape != images.shape:
        raise ValueError(f"sequence_maps has shape {maps.shape}, images {images.shape}")
    if len(secondary) != len(lesion_ids):
        raise ValueError(f"secondary has {len(secondary)} flags for {len(lesion_ids)} candidates")
    rows = np.zeros((len(lesion_ids), len(FEATURE_NAMES)), dtype=np.float64)
    label_map = np.asarray(labels)
    if not np.issubdtype(label_map.dtype, np.integer):
        label_map = label_map.astype(np.int64)
    own_boxes = ndimage.find_objects(label_map)  # each candidate's own box (None: no voxel)
    for row, lesion_id in enumerate(lesion_ids):
        own = own_boxes[lesion_id - 1] if 0 < lesion_id <= len(own_boxes) else None
        if own is None:
            raise ValueError(f"candidate {lesion_id} has no voxel in the label map")
        lo = [max(0, o.start - _MARGIN) for o in own]
        hi = [min(n, o.stop + _MARGIN) for o, n in zip(own, shape, strict=True)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        blob = labels[box] == lesion_id
        ring = ndimage.binary_dilation(blob, iterations=_RING_VOXELS) & ~blob
        core = ndimage.binary_erosion(blob)
        if not core.any():
            core = blob
        edge = blob & ~core
        values = [
            _logit(float(np.asarray(cspca_map)[box][blob].max())),
            float(np.asarray(score_map)[box][blob].max()),
            float(np.asarray(fused_map)[box][blob].max()),
            float(np.log(blob.sum())),
        ]
        for k in range(len(SEQUENCES)):
            crop = images[k][box]
            gradient = np.hypot(np.gradient(crop, axis=1), np.gradient(crop, axis=2))
            inside, around = crop[blob], crop[ring]
            values += [
                float(inside.mean()),
                float(inside.std()),
                float(around.mean()) if around.size else float(inside.mean()),
                float(around.std()) if around.size else 0.0,
                float(inside.mean() - around.mean()) if around.size else 0.0,
                float(crop[core].mean()),
                float(gradient[edge].mean()) if edge.any() else 0.0,
                float(inside.min()),
                float(inside.max()),
            ]
        values += [float(o.stop - o.start) for o in own]
        values += [float(maps[k][box][blob].max()) for k in range(len(SEQUENCES))]
        values.append(1.0 if secondary[row] else 0.0)
        rows[row] = values
    return rows


def missing_as_nan(features: np.ndarray, availability: np.ndarray, names: Sequence[str] = FEATURE_NAMES) -> np.ndarray:
    """A copy of ``features [N, F]`` with every feature of a sequence absent in ``availability [S]`` set to NaN."""
    x = np.array(features, dtype=np.float64, copy=True).reshape(-1, len(names))
    present = np.asarray(availability, dtype=np.float64).reshape(-1)
    for k, sequence in enumerate(SEQUENCES):
        if present[k] <= 0.5:
            x[:, [j for j, name in enumerate(names) if name.startswith(sequence + "_")]] = np.nan
    return x


@dataclass(frozen=True)
class Tree:
    """One regression tree of the boosted ensemble, as flat arrays indexed by node (node 0 is the root).

    A node with ``feature[i] < 0`` is a leaf with value ``value[i]``; otherwise a sample goes to ``left[i]`` when
    its feature ``feature[i]`` is ``<= threshold[i]``, to ``right[i]`` when it is larger, and to the left child
    when the feature is missing (NaN) and ``missing_left[i]``, else to the right one.
    """

    feature: tuple[int, ...]
    threshold: tuple[float, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    value: tuple[float, ...]
    missing_left: tuple[bool, ...]

    def __post_init__(self) -> None:
        n = len(self.feature)
        if not n or any(len(a) != n for a in (self.threshold, self.left, self.right, self.value, self.missing_left)):
            raise ValueError("lesion scorer: a tree's node arrays must be non-empty and of equal length")
        for i, f in enumerate(self.feature):
            if f >= 0 and not (0 < self.left[i] < n and 0 < self.right[i] < n):
                raise ValueError(f"lesion scorer: node {i} points outside its tree")

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": list(self.feature),
            "threshold": list(self.threshold),
            "left": list(self.left),
            "right": list(self.right),
            "value": list(self.value),
            "missing_left": [int(v) for v in self.missing_left],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tree:
        return cls(
            feature=tuple(int(v) for v in data["feature"]),
            threshold=tuple(float(v) for v in data["threshold"]),
            left=tuple(int(v) for v in data["left"]),
            right=tuple(int(v) for v in data["right"]),
            value=tuple(float(v) for v in data["value"]),
            missing_left=tuple(bool(v) for v in data["missing_left"]),
        )


@dataclass(frozen=True)
class BoostedTrees:
    """The log-odds ``baseline + sum_t tree_t(x)`` of a boosted-tree ensemble (binary log-loss), numpy only.

    Attributes:
        baseline: the ensemble's initial log-odds.
        trees: the boosted trees (leaf values include the learning rate).
    """

    baseline: float
    trees: tuple[Tree, ...]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Log-odds ``[N]`` of feature rows ``x [N, F]`` (NaN = missing)."""
        feature, threshold, left, right, value, missing_left = self._packed
        rows = np.arange(x.shape[0])[:, None]
        trees = np.arange(feature.shape[0])[None, :]
        node = np.zeros((x.shape[0], feature.shape[0]), dtype=np.int64)  # every sample in every tree, at once
        for _ in range(feature.shape[1]):  # at most one level per node
            split = feature[trees, node]
            inner = split >= 0
            if not inner.any():
                break
            v = x[rows, np.where(inner, split, 0)]
            go_left = np.where(np.isnan(v), missing_left[trees, node], v <= threshold[trees, node])
            node = np.where(inner, np.where(go_left, left[trees, node], right[trees, node]), node)
        return np.asarray(self.baseline + value[trees, node].sum(axis=1), dtype=np.float64)

    @functools.cached_property
    def _packed(self) -> tuple[np.ndarray, ...]:
        """The trees as ``[T, max nodes]`` arrays (feature, threshold, left, right, value, missing_left), padded
        with leaves; built once per ensemble."""
        width = max((len(tree.feature) for tree in self.trees), default=1)
        shape = (len(self.trees), width)
        feature = np.full(shape, -1, dtype=np.int64)
        threshold, value = np.zeros(shape), np.zeros(shape)
        left, right = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
        missing_left = np.zeros(shape, dtype=bool)
        for t, tree in enumerate(self.trees):
            n = len(tree.feature)
            feature[t, :n], threshold[t, :n], value[t, :n] = tree.feature, tree.threshold, tree.value
            left[t, :n], right[t, :n], missing_left[t, :n] = tree.left, tree.right, tree.missing_left
        return feature, threshold, left, right, value, missing_left

    def affine(self, slope: float, intercept: float) -> BoostedTrees:
        """The ensemble whose log-odds are ``slope * logits + intercept`` (leaf values x slope, baseline x slope +
        intercept): exactly representable."""
        trees = tuple(dataclasses.replace(t, value=tuple(float(v) * slope for v in t.value)) for t in self.trees)
        return BoostedTrees(float(self.baseline) * slope + intercept, trees)

    def max_feature(self) -> int:
        return max((max(tree.feature) for tree in self.trees), default=-1)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "trees": [tree.to_dict() for tree in self.trees]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoostedTrees:
        return cls(baseline=float(data["baseline"]), trees=tuple(Tree.from_dict(t) for t in data["trees"]))


@dataclass(frozen=True)
class LesionScorer:
    """Gradient-boosted trees (binary log-loss) for "this candidate is a csPCa lesion" on :data:`FEATURE_NAMES`,
    and optionally for "this csPCa lesion is category 5" (PI-RADS' >= 15 mm).

    ``P = sigmoid(baseline + sum_t tree_t(x))``: the trees of scikit-learn's ``HistGradientBoostingClassifier``
    (``training.lesion_scoring``), evaluated here with numpy alone so the service needs no scikit-learn (a test
    checks the two agree). The features of sequences that are absent from a study are missing (NaN); each node
    sends a missing value the way the fit learned, or to its larger child.

    Together the two models are an ordinal (continuation-ratio) formulation of a lesion's category:
    ``P(category >= 4)`` is the csPCa likelihood, ``P(category 5 | category >= 4)`` the category-5 model's
    probability (:func:`coherent_category`).

    Attributes:
        feature_names: the features, in order (must equal :data:`FEATURE_NAMES` of the code that applies it).
        baseline: the csPCa ensemble's initial log-odds.
        trees: the csPCa ensemble's boosted trees (leaf values include the learning rate).
        no_candidate_probability: the study csPCa probability of a study without any candidate (the share of
            csPCa among such studies of the fitting data, smoothed).
        fitted_on: where and how it was fitted (for the record: seeds, cases, counts, settings, recalibration).
        category5: the category-5 ensemble (fitted on the candidates that overlap a csPCa lesion: category 5
            against 4), or ``None``: the network's score decides 4 against 5 (releases 7-8).
        lesion: the lesion ensemble (fitted on every candidate: it overlaps a lesion of any kind, benign ones
            included, against none), or ``None`` (releases 7-8): below csPCa, it separates category 2 (a benign
            lesion) from 1 (no lesion) (:func:`coherent_category`).
    """

    feature_names: tuple[str, ...]
    baseline: float
    trees: tuple[Tree, ...]
    no_candidate_probability: float
    fitted_on: dict[str, Any] = field(default_factory=dict)
    category5: BoostedTrees | None = None
    lesion: BoostedTrees | None = None

    def __post_init__(self) -> None:
        n = len(self.feature_names)
        for ensemble in (self._ensemble, self.category5, self.lesion):
            if ensemble is not None and ensemble.max_feature() >= n:
                raise ValueError(f"lesion scorer: a tree splits on feature {ensemble.max_feature()} of {n}")
        if not 0.0 <= self.no_candidate_probability <= 1.0:
            raise ValueError(f"lesion scorer: no_candidate_probability {self.no_candidate_probability} not in [0, 1]")

    @functools.cached_property
    def _ensemble(self) -> BoostedTrees:
        return BoostedTrees(self.baseline, self.trees)

    def check_features(self, names: Sequence[str] = FEATURE_NAMES) -> None:
        """Raise ``ValueError`` naming the difference when the scorer's features are not ``names``."""
        if tuple(self.feature_names) != tuple(names):
            missing = [n for n in names if n not in self.feature_names]
            extra = [n for n in self.feature_names if n not in names]
            raise ValueError(
                "the lesion scorer was fitted on other features than this code computes"
                f" (missing {missing}, unknown {extra}, or another order): refit it (`mpmri fit-lesion-scorer`)"
            )

    def _rows(self, features: np.ndarray, availability: np.ndarray | None) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64).reshape(-1, len(self.feature_names))
        return x if availability is None else missing_as_nan(x, availability, self.feature_names)

    def logits(self, features: np.ndarray, availability: np.ndarray | None = None) -> np.ndarray:
        """csPCa log-odds ``[N]`` of feature rows ``[N, F]``; the features of sequences absent in
        ``availability [S]`` are treated as missing."""
        return self._ensemble.logits(self._rows(features, availability))

    def category5_probability(self, features: np.ndarray, availability: np.ndarray | None = None) -> np.ndarray | None:
        """``P(category 5 | csPCa)`` ``[N]`` of feature rows ``[N, F]``, or ``None`` without a category-5 model."""
        return _probability(self.category5, self._rows(features, availability))

    def lesion_probability(self, features: np.ndarray, availability: np.ndarray | None = None) -> np.ndarray | None:
        """``P(a lesion of any kind)`` ``[N]`` of feature rows ``[N, F]``, or ``None`` without a lesion model."""
        return _probability(self.lesion, self._rows(features, availability))

    def probability(self, features: np.ndarray, availability: np.ndarray | None = None) -> np.ndarray:
        """csPCa probabilities ``[N]`` in (0, 1) of feature rows ``[N, F]`` (see :meth:`logits`)."""
        return _sigmoid(self.logits(features, availability))

    @property
    def recalibration(self) -> dict[str, Any] | None:
        """The study-level Platt map folded into this scorer (:meth:`recalibrated`), or ``None``."""
        record = self.fitted_on.get("recalibration")
        return dict(record) if isinstance(record, dict) else None

    def recalibrated(self, slope: float, intercept: float, record: dict[str, Any] | None = None) -> LesionScorer:
        """This scorer with the Platt map ``logit -> slope * logit + intercept`` folded into it.

        Exactly representable: every leaf value is multiplied by ``slope`` and the baseline becomes
        ``slope * baseline + intercept``, so the served evaluator and the model repository need no change and
        the candidates keep their order. ``no_candidate_probability`` (an observed share) stays. ``record`` (where
        and how the map was fitted) is stored as ``fitted_on["recalibration"]`` with the slope and intercept.

        Raises:
            ValueError: ``slope`` is not positive and finite (the map would reorder the candidates) or
                ``intercept`` is not finite, or this scorer is already recalibrated (names on what).
        """
        if not (np.isfinite(slope) and slope > 0.0 and np.isfinite(intercept)):
            raise ValueError(
                f"a recalibration needs a positive finite slope and a finite intercept, got {slope}, {intercept}"
            )
        if self.recalibration is not None:
            raise ValueError(
                f"the lesion scorer is already recalibrated ({self.recalibration.get('data', 'unknown data')}):"
                " recalibrate a scorer as fitted (`mpmri fit-lesion-scorer`)"
            )
        mapped = self._ensemble.affine(slope, intercept)
        fitted_on = {
            **self.fitted_on,
            "recalibration": {**(record or {}), "slope": float(slope), "intercept": float(intercept)},
        }
        return LesionScorer(
            feature_names=self.feature_names,
            baseline=mapped.baseline,
            trees=mapped.trees,
            no_candidate_probability=self.no_candidate_probability,
            fitted_on=fitted_on,
            category5=self.category5,
            lesion=self.lesion,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "gradient-boosted trees, binary log-loss (scikit-learn HistGradientBoostingClassifier)",
            "feature_names": list(self.feature_names),
            "baseline": self.baseline,
            "trees": [tree.to_dict() for tree in self.trees],
            "no_candidate_probability": self.no_candidate_probability,
            "fitted_on": dict(self.fitted_on),
            **({} if self.category5 is None else {"category5": self.category5.to_dict()}),
            **({} if self.lesion is None else {"lesion": self.lesion.to_dict()}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LesionScorer:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming the missing key or bad value."""
        try:
            return cls(
                feature_names=tuple(str(n) for n in data["feature_names"]),
                baseline=float(data["baseline"]),
                trees=tuple(Tree.from_dict(t) for t in data["trees"]),
                no_candidate_probability=float(data["no_candidate_probability"]),
                fitted_on=dict(data.get("fitted_on", {})),
                category5=BoostedTrees.from_dict(data["category5"]) if data.get("category5") else None,
                lesion=BoostedTrees.from_dict(data["lesion"]) if data.get("lesion") else None,
            )
        except KeyError as err:
            raise ValueError(f"the lesion scorer lacks {err.args[0]!r}") from err
        except (TypeError, ValueError) as err:
            raise ValueError(f"the lesion scorer is malformed: {err}") from err

    @classmethod
    def from_json(cls, text: str) -> LesionScorer:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the lesion scorer is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError("the lesion scorer must be a JSON object")
        return cls.from_dict(data)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float64)


def _probability(ensemble: BoostedTrees | None, x: np.ndarray) -> np.ndarray | None:
    return None if ensemble is None else _sigmoid(ensemble.logits(x))


def scorer_from_metadata(metadata: dict[str, Any]) -> LesionScorer | None:
    """The lesion scorer a checkpoint's metadata carries (``metadata["lesion_scoring"]``), or ``None``.

    Raises:
        ValueError: it is malformed, or fitted on other features than this code computes (names the difference).
    """
    data = metadata.get("lesion_scoring")
    if not data:
        return None
    scorer = LesionScorer.from_dict(data)
    scorer.check_features()
    return scorer


def coherent_category(
    category: int,
    likelihood: float,
    category5_probability: float | None = None,
    lesion_probability: float | None = None,
) -> int:
    """A lesion's PI-RADS-like category brought into agreement with its csPCa likelihood.

    csPCa means category ``>= CSPCA_MIN_PIRADS`` (4) in this contract, so a lesion the scorer calls more likely
    csPCa than not (``likelihood >= 0.5``) is at least category 4, and one it calls less likely is at most 3; the
    network's own category (:func:`contract.pirads_category` of its score) stands where it already agrees. With a
    ``category5_probability`` (the scorer's ``P(5 | csPCa)``), a csPCa lesion is 5 when it is ``>= 0.5``, else 4.
    With a ``lesion_probability`` (the scorer's ``P(a lesion of any kind)``), a lesion below csPCa is 1 when that
    is ``< 0.5`` (no lesion there), else the network's category held between 2 and 3 (a benign lesion).
    """
    if likelihood >= CSPCA_LIKELIHOOD_THRESHOLD:
        if category5_probability is not None:
            five = category5_probability >= CATEGORY5_PROBABILITY_THRESHOLD
            return CSPCA_MIN_PIRADS + 1 if five else CSPCA_MIN_PIRADS
        return max(int(category), CSPCA_MIN_PIRADS)
    if lesion_probability is not None:
        if lesion_probability < LESION_PROBABILITY_THRESHOLD:
            return 1
        return min(max(int(category), 2), CSPCA_MIN_PIRADS - 1)
    return min(int(category), CSPCA_MIN_PIRADS - 1)


def coherent_distribution(
    distribution: Sequence[float], cspca_probability: float, category5_probability: float | None = None
) -> list[float]:
    """The categories' distribution ``[5]`` rescaled so that ``P(category >= 4)`` is ``cspca_probability``.

    Within the csPCa categories (4-5) and within the others (1-3) the network's proportions stay; where the
    network puts no mass on a side, that side's mass goes to category 4, or 2 (the categories the contract
    reports for a csPCa lesion and for a study without one). With ``category5_probability`` (``P(5 | csPCa)`` of
    the study's most likely lesion) the csPCa mass splits by it instead: ``P(5) = cspca_probability x`` it.
    """
    dist = np.clip(np.asarray(distribution, dtype=np.float64).reshape(-1), 0.0, None)
    if dist.size != len(PIRADS_CATEGORIES):
        raise ValueError(f"pirads_distribution must have {len(PIRADS_CATEGORIES)} values, got {dist.size}")
    p = min(max(float(cspca_probability), 0.0), 1.0)
    split = PIRADS_CATEGORIES.index(CSPCA_MIN_PIRADS)
    out = np.zeros_like(dist)
    for side, mass, fallback in ((slice(0, split), 1.0 - p, 1), (slice(split, None), p, split)):
        total = float(dist[side].sum())
        if total > 1e-12:
            out[side] = dist[side] / total * mass
        else:
            out[fallback] = mass
    if category5_probability is not None:
        q = min(max(float(category5_probability), 0.0), 1.0)
        out[split], out[split + 1] = p * (1.0 - q), p * q
    return [float(v) for v in out]
