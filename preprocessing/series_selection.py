"""Series identification (T2W, ADC, high-b DWI) with rules kept as data (``series_rules.json``).

A site can pass its own rules file (same format; docs/preprocessing.md). Each series is first checked
against the ``ignore`` rules (localizers, secondary captures, non-image modalities), then classified
by the first sequence in ``classification_order`` whose ``match_any`` matches and whose ``exclude_any``
does not. Among the candidates of a sequence one is chosen (axial preferred; for DWI the highest
b-value >= :data:`contract.MIN_HIGH_B_VALUE_S_PER_MM2`, dedicated high-b series preferred).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contract import MIN_HIGH_B_VALUE_S_PER_MM2, SEQUENCES
from preprocessing.dicom_io import FrameHeader, SeriesInfo
from preprocessing.errors import RulesFileError

DEFAULT_RULES_PATH = Path(__file__).with_name("series_rules.json")
SUPPORTED_RULES_FORMAT = 1


@dataclass(frozen=True)
class _Criteria:
    description_patterns: tuple[re.Pattern[str], ...] = ()
    image_type_any: frozenset[str] = frozenset()
    scanning_sequence_any: frozenset[str] = frozenset()
    has_b_values: bool = False

    def first_match(self, series: SeriesInfo) -> str | None:
        """Human-readable description of the first criterion that ``series`` meets, else ``None``."""
        for pat in self.description_patterns:
            for field_name, text in (("SeriesDescription", series.description), ("ProtocolName", series.protocol_name)):
                if text and pat.search(text):
                    return f"{field_name} '{text}' matches /{pat.pattern}/"
        hit = self.image_type_any.intersection(series.image_type)
        if hit:
            return f"ImageType contains {sorted(hit)[0]}"
        hit = self.scanning_sequence_any.intersection(series.scanning_sequence)
        if hit:
            return f"ScanningSequence contains {sorted(hit)[0]}"
        if self.has_b_values and series.b_values_s_per_mm2:
            return f"b-values {_fmt_b(series.b_values_s_per_mm2)} in the headers"
        return None


@dataclass(frozen=True)
class SequenceRule:
    name: str
    match_any: _Criteria
    exclude_any: _Criteria
    prefer: str = "axial"
    prefer_dedicated_high_b: bool = True
    b_value_from_description: re.Pattern[str] | None = None


@dataclass(frozen=True)
class SeriesRules:
    """Parsed, validated rules file."""

    source: str
    ignore_modalities: frozenset[str]
    ignore_sop_class_prefixes: tuple[str, ...]
    ignore: _Criteria
    order: tuple[str, ...]
    sequences: dict[str, SequenceRule]


def _compile(patterns: Any, where: str) -> tuple[re.Pattern[str], ...]:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise RulesFileError(f"rules file: {where} must be a list of regex strings")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise RulesFileError(f"rules file: invalid regex {p!r} in {where}: {err}") from err
    return tuple(out)


def _criteria(d: Any, where: str) -> _Criteria:
    if d is None:
        return _Criteria()
    if not isinstance(d, dict):
        raise RulesFileError(f"rules file: {where} must be an object")
    known = {"description_patterns", "image_type_any", "scanning_sequence_any", "has_b_values"}
    unknown = set(d) - known
    if unknown:
        raise RulesFileError(f"rules file: unknown key(s) {sorted(unknown)} in {where}")
    return _Criteria(
        description_patterns=_compile(d.get("description_patterns", []), f"{where}.description_patterns"),
        image_type_any=frozenset(str(v).upper() for v in d.get("image_type_any", [])),
        scanning_sequence_any=frozenset(str(v).upper() for v in d.get("scanning_sequence_any", [])),
        has_b_values=bool(d.get("has_b_values", False)),
    )


def load_rules(path: Path | None = None) -> SeriesRules:
    """Read and validate a rules file (``None``: the packaged ``series_rules.json``)."""
    path = Path(path) if path is not None else DEFAULT_RULES_PATH
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RulesFileError(f"rules file {path}: cannot read ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise RulesFileError(f"rules file {path}: not valid JSON (line {err.lineno}: {err.msg})") from err
    return parse_rules(raw, source=str(path))


def parse_rules(raw: Any, source: str = "<dict>") -> SeriesRules:
    """Validate an already-parsed rules document (format in docs/preprocessing.md)."""
    if not isinstance(raw, dict):
        raise RulesFileError("rules file: top level must be an object")
    if raw.get("format_version") != SUPPORTED_RULES_FORMAT:
        raise RulesFileError(f"rules file: format_version must be {SUPPORTED_RULES_FORMAT}")
    ign = raw.get("ignore", {})
    if not isinstance(ign, dict):
        raise RulesFileError("rules file: 'ignore' must be an object")
    seqs = raw.get("sequences")
    if not isinstance(seqs, dict):
        raise RulesFileError("rules file: 'sequences' must be an object")
    missing = [s for s in SEQUENCES if s not in seqs]
    if missing:
        raise RulesFileError(f"rules file: no rule for sequence(s) {missing}")
    order = tuple(raw.get("classification_order", SEQUENCES))
    if sorted(order) != sorted(SEQUENCES):
        raise RulesFileError(f"rules file: classification_order must list each of {list(SEQUENCES)} once")
    rules: dict[str, SequenceRule] = {}
    for name in SEQUENCES:
        d = seqs[name]
        if not isinstance(d, dict):
            raise RulesFileError(f"rules file: sequences.{name} must be an object")
        prefer = d.get("prefer", "axial")
        if prefer not in ("axial", "none"):
            raise RulesFileError(f"rules file: sequences.{name}.prefer must be 'axial' or 'none'")
        bpat = d.get("b_value_from_description_pattern")
        rules[name] = SequenceRule(
            name=name,
            match_any=_criteria(d.get("match_any"), f"sequences.{name}.match_any"),
            exclude_any=_criteria(d.get("exclude_any"), f"sequences.{name}.exclude_any"),
            prefer=prefer,
            prefer_dedicated_high_b=bool(d.get("prefer_dedicated_high_b", True)),
            b_value_from_description=_compile([bpat], f"sequences.{name}.b_value_from_description_pattern")[0]
            if bpat
            else None,
        )
    ignore_crit = _criteria({k: v for k, v in ign.items() if k in ("description_patterns", "image_type_any")}, "ignore")
    return SeriesRules(
        source=source,
        ignore_modalities=frozenset(str(m).upper() for m in ign.get("modalities", [])),
        ignore_sop_class_prefixes=tuple(str(p) for p in ign.get("sop_class_uid_prefixes", [])),
        ignore=ignore_crit,
        order=order,
        sequences=rules,
    )


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------
def ignore_reason(series: SeriesInfo, rules: SeriesRules) -> str | None:
    """Why ``series`` is not an input image (localizer, secondary capture, non-image, not MR), else ``None``."""
    if series.modality.upper() in rules.ignore_modalities:
        return f"non-image object (modality {series.modality})"
    for prefix in rules.ignore_sop_class_prefixes:
        if series.sop_class_uid.startswith(prefix):
            return f"derived secondary capture / non-image SOP class {series.sop_class_uid}"
    hit = rules.ignore.first_match(series)
    if hit:
        return f"localizer/scout ({hit})"
    if series.modality.upper() != "MR":
        return f"not MR (modality {series.modality or 'missing'})"
    return None


def classify(series: SeriesInfo, rules: SeriesRules) -> tuple[str | None, str]:
    """``(sequence or None, reason)`` for one (not ignored) series."""
    for name in rules.order:
        rule = rules.sequences[name]
        why = rule.match_any.first_match(series)
        if why is None:
            continue
        veto = rule.exclude_any.first_match(series)
        if veto is not None:
            continue
        return name, f"{name} rule: {why}"
    return None, "matches no sequence rule"


def slice_normal(frame: FrameHeader) -> np.ndarray | None:
    """Unit slice normal (LPS) of a frame: cross(row direction, column direction)."""
    if frame.orientation is None:
        return None
    o = np.asarray(frame.orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 1e-6 else None


def axialness(series: SeriesInfo) -> float:
    """``|normal . z|`` of the series' first oriented frame: 1 for axial, 0 for sagittal/coronal."""
    for f in series.frames:
        n = slice_normal(f)
        if n is not None:
            return float(abs(n[2]))
    return 0.0


def plane_name(series: SeriesInfo) -> str:
    for f in series.frames:
        n = slice_normal(f)
        if n is not None:
            return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(n)))]
    return "unknown plane"


def _fmt_b(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


@dataclass
class Choice:
    """The series (and frames) chosen for one sequence."""

    sequence: str
    series: SeriesInfo
    frames: list[FrameHeader]
    reason: str
    b_value_s_per_mm2: float | None = None

    def to_meta(self) -> dict[str, Any]:
        return {
            "series_uid": self.series.series_uid,
            "description": self.series.description,
            "series_number": self.series.series_number,
            "reason": self.reason,
            "b_value": self.b_value_s_per_mm2,
            "num_frames": len(self.frames),
        }


@dataclass
class Selection:
    choices: dict[str, Choice] = field(default_factory=dict)
    #: every considered series: uid, description, classification or ignore reason
    series_table: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: further candidates per sequence, in preference order (fallbacks when the first cannot be built)
    alternatives: dict[str, list[Choice]] = field(default_factory=dict)


def _generic_key(series: SeriesInfo, rule: SequenceRule) -> tuple[float, int, int, str]:
    ax = axialness(series) if rule.prefer == "axial" else 0.0
    return (round(ax, 3), len(series.frames), series.series_number or 0, series.series_uid)


def _dwi_candidates(series: SeriesInfo, rule: SequenceRule, min_b: float, sel: Selection) -> list[tuple[Choice, bool]]:
    """Split one DWI series by b-value; returns high-b candidates with their 'dedicated' flag."""
    frames = list(series.frames)
    source = "headers"
    if all(f.b_value_s_per_mm2 is None for f in frames):
        m = rule.b_value_from_description.findall(series.description) if rule.b_value_from_description else []
        if len(m) != 1:
            sel.skipped.append(
                {
                    "source": f"series '{series.description}'",
                    "series_uid": series.series_uid,
                    "reason": "DWI series without b-values (no DiffusionBValue or vendor tag, none in its description)",
                }
            )
            return []
        b = float(m[0])
        frames = [dataclasses.replace(f, b_value_s_per_mm2=b) for f in frames]
        source = "SeriesDescription"
    elif any(f.b_value_s_per_mm2 is None for f in frames):
        n = sum(f.b_value_s_per_mm2 is None for f in frames)
        sel.warnings.append(f"DWI series '{series.description}': {n} frame(s) without b-value ignored")
    by_b: dict[float, list[FrameHeader]] = {}
    for f in frames:
        if f.b_value_s_per_mm2 is not None:
            by_b.setdefault(float(f.b_value_s_per_mm2), []).append(f)
    all_b = sorted(by_b)
    high = [b for b in all_b if b >= min_b]
    dedicated = len(high) == 1
    out = []
    for b in high:
        kind = "dedicated high-b series" if dedicated else f"split of multi-b series {_fmt_b(all_b)}"
        out.append(
            (
                Choice(
                    sequence="dwi",
                    series=series,
                    frames=by_b[b],
                    reason=f"b={b:g} s/mm^2 (from {source}), {kind}",
                    b_value_s_per_mm2=b,
                ),
                dedicated,
            )
        )
    return out


def select_series(
    series_list: list[SeriesInfo], rules: SeriesRules, min_b_value_s_per_mm2: float = MIN_HIGH_B_VALUE_S_PER_MM2
) -> Selection:
    """Classify every series and choose one per sequence (see module docstring). Never raises for missing ones."""
    sel = Selection()
    candidates: dict[str, list[tuple[SeriesInfo, str]]] = {s: [] for s in SEQUENCES}
    for series in series_list:
        row: dict[str, Any] = series.summary()
        reason = ignore_reason(series, rules)
        if reason is not None:
            row["ignored"] = reason
            sel.skipped.append(
                {"source": f"series '{series.description}'", "series_uid": series.series_uid, "reason": reason}
            )
        else:
            seq, why = classify(series, rules)
            row["sequence"] = seq
            row["classification"] = why
            if seq is None:
                sel.skipped.append(
                    {"source": f"series '{series.description}'", "series_uid": series.series_uid, "reason": why}
                )
            else:
                candidates[seq].append((series, why))
        sel.series_table.append(row)

    for name in SEQUENCES:
        rule = rules.sequences[name]
        cands = candidates[name]
        if not cands:
            continue
        if name == "dwi":
            scored: list[tuple[tuple[Any, ...], Choice]] = []
            for series, why in cands:
                for choice, dedicated in _dwi_candidates(series, rule, min_b_value_s_per_mm2, sel):
                    b = choice.b_value_s_per_mm2 or 0.0
                    generic = _generic_key(series, rule)
                    key = (dedicated, b, *generic) if rule.prefer_dedicated_high_b else (b, dedicated, *generic)
                    choice.reason = f"{why}; {choice.reason}"
                    scored.append((key, choice))
            if not scored:
                found = sorted({b for s, _ in cands for b in s.b_values_s_per_mm2})
                sel.warnings.append(
                    f"dwi missing: no DWI frames with b >= {min_b_value_s_per_mm2:g} s/mm^2 "
                    f"(found b-values {_fmt_b(found)})"
                )
                continue
            scored.sort(key=lambda kc: kc[0], reverse=True)
            ranked = [c for _, c in scored]
            first = ranked[0]
            pref = "dedicated high-b series preferred, then " if rule.prefer_dedicated_high_b else ""
            first.reason += (
                f"; chosen among {len(ranked)} high-b candidate(s) ({pref}highest b"
                f"{', axial preferred' if rule.prefer == 'axial' else ''})"
            )
        else:
            ranked_series = sorted(cands, key=lambda c: _generic_key(c[0], rule), reverse=True)
            ranked = [Choice(sequence=name, series=s, frames=list(s.frames), reason=why) for s, why in ranked_series]
            first = ranked[0]
            if len(ranked) > 1:
                others = ", ".join(f"'{c.series.description}' ({plane_name(c.series)})" for c in ranked[1:])
                crit = (
                    "axial preferred (slice normal closest to patient z)" if rule.prefer == "axial" else "most slices"
                )
                first.reason += f"; {plane_name(first.series)}, {crit} over {others}"
            if rule.prefer == "axial" and axialness(first.series) < 0.5:
                sel.warnings.append(
                    f"{name}: no axial series; using {plane_name(first.series)} '{first.series.description}'"
                )
        sel.choices[name] = first
        sel.alternatives[name] = ranked[1:]
    return sel
