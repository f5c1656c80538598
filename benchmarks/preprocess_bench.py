"""Benchmark: DICOM study -> normalized model tensor ``[S, D, H, W]``, mpmri against a MONAI chain.

One run measures, **interleaved** (round-robin: every round runs every variant at every grid with both
methods, the order of the two methods alternating from round to round), on the same synthetic study
(``mpmri synth`` seed 7 index 0; no patient data) written as:

* ``plain`` -- the generator's files (Explicit VR Little Endian, no scanner headers);
* ``scanner`` -- the same images with scanner-like headers (nested sequences, Siemens CSA / GE / Philips
  private groups: ``SynthConfig.scanner_headers_every = 1``);
* ``rle``, ``jpeg-ls``, ``jpeg2000`` (and ``jpeg-sv1`` where dcmtk is installed, ``htj2k`` where OpenJPH's
  ``ojph_compress`` is installed) -- the plain files re-encoded losslessly (``preprocessing.testing.encode``),

at two grids: ``contract.DEFAULT_GRID`` (16 x 64 x 64, 3.0 x 1.5 x 1.5 mm) and ``contract.REALISTIC_GRID``
(24 x 256 x 256, 3.0 x 0.5 x 0.5 mm, the grid of deployed GPU models).

* ``mpmri`` -- ``preprocessing.preprocess_study`` on the study folder (series selection included), default
  settings (channels resampled/normalized in threads);
* ``monai`` -- a MONAI dictionary transform chain on three folders holding the instances our selection chose
  (the chosen series; of a multi-b DWI series only the chosen b-value): it has no series or b-value selection
  of its own, so it does strictly less work: ``LoadImaged(PydicomReader)`` ->
  ``EnsureChannelFirstd`` -> ``Spacingd`` -> ``ResizeWithPadOrCropd`` -> ``ResampleToMatchd`` ->
  ``ScaleIntensityRangePercentilesd`` / ``ScaleIntensityRanged`` -> ``ConcatItemsd``.

The speed-up is the median over rounds of ``monai wall / mpmri wall`` of the same round (robust to other
jobs on a shared machine), with its interquartile range and min-max. Per-core throughput comes from the
process CPU time per study (all threads). Cores per GPU = CPU ms per study / GPU ms per study, with the GPU
figures of ``DEFAULT_GPU_MS`` (given, not measured here). Run::

    .venv/bin/python benchmarks/preprocess_bench.py [--rounds 11] [--write BENCHMARKS.md]

``--write`` replaces the section between ``<!-- preprocess:begin -->`` and ``<!-- preprocess:end -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import contract
from preprocessing.numba_target import cpu_model_name

#: the demo's study; a single high-b DWI series so both methods read the same three series
DEFAULT_SEED = 7
DEFAULT_INDEX = 0
#: GPU time per study of the networks at the realistic grid (H200, batch 8; issue 9): torch fp32 and
#: compiled fp16. Inputs to the cores-per-GPU column, not measured by this script.
DEFAULT_GPU_MS = {"H200 torch fp32, batch 8": 6.0, "H200 compiled fp16, batch 8": 3.7}
MARK_BEGIN = "<!-- preprocess:begin -->"
MARK_END = "<!-- preprocess:end -->"
GRIDS: dict[str, contract.GridSpec] = {"default": contract.DEFAULT_GRID, "realistic": contract.REALISTIC_GRID}


def build_monai_chain(grid: contract.GridSpec = contract.DEFAULT_GRID) -> Callable[[dict[str, str]], dict[str, Any]]:
    from monai.data import PydicomReader
    from monai.transforms import (
        Compose,
        ConcatItemsd,
        EnsureChannelFirstd,
        LoadImaged,
        ResampleToMatchd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    d, h, w = grid.size_dhw
    sd, sh, sw = grid.spacing_mm_dhw
    keys = list(contract.SEQUENCES)
    pct = [k for k in keys if isinstance(contract.NORMALIZATION[k], contract.PercentileNormalization)]
    fixed = [k for k in keys if isinstance(contract.NORMALIZATION[k], contract.FixedScaleNormalization)]
    transforms: list[Any] = [
        LoadImaged(keys=keys, reader=PydicomReader()),  # type: ignore[arg-type]  # instances are accepted
        EnsureChannelFirstd(keys=keys),
        Spacingd(keys=["t2w"], pixdim=(sw, sh, sd), mode="bilinear"),
        ResizeWithPadOrCropd(keys=["t2w"], spatial_size=(w, h, d)),
        ResampleToMatchd(keys=[k for k in keys if k != "t2w"], key_dst="t2w", mode="bilinear"),
    ]
    for k in pct:
        spec = contract.NORMALIZATION[k]
        assert isinstance(spec, contract.PercentileNormalization)
        transforms.append(
            ScaleIntensityRangePercentilesd(
                keys=[k], lower=spec.lower_percentile, upper=spec.upper_percentile, b_min=0.0, b_max=1.0, clip=False
            )
        )
    for k in fixed:
        spec_f = contract.NORMALIZATION[k]
        assert isinstance(spec_f, contract.FixedScaleNormalization)
        transforms.append(
            ScaleIntensityRanged(keys=[k], a_min=0.0, a_max=spec_f.divisor, b_min=0.0, b_max=1.0, clip=False)
        )
    transforms.append(ConcatItemsd(keys=keys, name="image"))
    return Compose(transforms)


def run_monai(
    chain: Callable[[dict[str, str]], dict[str, Any]], series_dirs: dict[str, Path]
) -> tuple[np.ndarray, dict[str, float]]:
    out = chain({s: str(series_dirs[s]) for s in contract.SEQUENCES})
    image = np.asarray(out["image"])  # [S, W, H, D] in MONAI's (i, j, k) convention
    return image.transpose(0, 3, 2, 1), {}


def run_mpmri(folder: Path, grid: contract.GridSpec) -> tuple[np.ndarray, dict[str, float]]:
    from preprocessing.pipeline import PreprocessSettings, preprocess_study

    res = preprocess_study(folder, PreprocessSettings(grid=grid))
    return res.tensor, dict(res.meta["timings_s"])


@dataclass
class Variant:
    name: str
    dicom_dir: Path
    series_dirs: dict[str, Path]
    files: int
    megabytes: float


def _write_variant(
    name: str, blobs: dict[Path, bytes], root: Path, chosen: dict[str, str], b_values: dict[str, float | None]
) -> Variant:
    """Write ``blobs`` (relative path -> bytes) under ``root/name/dicom``, and for MONAI one folder per sequence
    (``root/name/monai/<seq>``) with the instances our selection chose: the chosen series, and of a multi-b
    DWI series only the chosen b-value (MONAI has no series or b-value selection of its own)."""
    import pydicom

    dicom_dir = root / name / "dicom"
    monai_dir = root / name / "monai"
    for rel, data in blobs.items():
        path = dicom_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for seq in contract.SEQUENCES:
        (monai_dir / seq).mkdir(parents=True, exist_ok=True)
    for rel, data in blobs.items():
        ds = pydicom.dcmread(dicom_dir / rel, stop_before_pixels=True)
        for seq in contract.SEQUENCES:
            if str(ds.SeriesInstanceUID) != chosen[seq]:
                continue
            b_value = ds.get("DiffusionBValue")
            if b_values[seq] is not None and b_value is not None and float(b_value) != b_values[seq]:
                continue
            (monai_dir / seq / rel.name).write_bytes(data)
    return Variant(
        name=name,
        dicom_dir=dicom_dir,
        series_dirs={s: monai_dir / s for s in contract.SEQUENCES},
        files=len(blobs),
        megabytes=sum(len(b) for b in blobs.values()) / 1e6,
    )


def prepare_variants(root: Path, seed: int, index: int) -> tuple[list[Variant], list[str]]:
    """The study as plain files, with scanner headers, and losslessly re-encoded; plus notes on skipped ones."""
    from preprocessing.pipeline import preprocess_study
    from preprocessing.testing import LOSSLESS_SYNTAXES, encode
    from synth.generator import SynthConfig, synthesize_study, write_study

    def study_blobs(every: int, name: str) -> dict[Path, bytes]:
        study = synthesize_study(seed, index, SynthConfig(scanner_headers_every=every))
        dicom = write_study(study, root / f"_{name}") / "dicom"
        return {p.relative_to(dicom): p.read_bytes() for p in sorted(dicom.rglob("*")) if p.is_file()}

    plain = study_blobs(0, "plain")
    ref = preprocess_study(list(plain.values()))
    chosen = {s: str(ref.meta["series"][s]["series_uid"]) for s in contract.SEQUENCES}
    b_values = {s: ref.meta["series"][s].get("b_value") if s == "dwi" else None for s in contract.SEQUENCES}
    variants = [_write_variant("plain", plain, root, chosen, b_values)]
    variants.append(_write_variant("scanner", study_blobs(1, "scanner"), root, chosen, b_values))
    notes: list[str] = []
    for syntax in ("rle", "jpeg-ls", "jpeg2000", "jpeg-sv1", "htj2k"):
        if syntax == "jpeg-sv1" and shutil.which("dcmcjpeg") is None:
            notes.append("jpeg-sv1 not measured: dcmtk's dcmcjpeg (its encoder) is not installed")
            continue
        if syntax == "htj2k" and shutil.which("ojph_compress") is None:
            notes.append("htj2k not measured: OpenJPH's ojph_compress (its encoder, openjph-tools) is not installed")
            continue
        encoded = {rel: encode(data, syntax) for rel, data in plain.items()}
        assert all(LOSSLESS_SYNTAXES[syntax].encode() in e[:400] for e in encoded.values())
        variants.append(_write_variant(syntax, encoded, root, chosen, b_values))
    return variants, notes


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)


def _measure(fn: Callable[[], tuple[np.ndarray, dict[str, float]]], into: Samples) -> np.ndarray:
    c0 = time.process_time()
    t0 = time.perf_counter()
    out, stages = fn()
    into.wall.append(time.perf_counter() - t0)
    into.cpu.append(time.process_time() - c0)
    into.stages.append(stages)
    return out


def _stage(s: Samples, name: str) -> float:
    """Median ms of one stage of ``meta["timings_s"]``."""
    return statistics.median(st.get(name, 0.0) for st in s.stages) * 1e3


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    return q1, med, q3


def _agreement(out: np.ndarray, ref: np.ndarray) -> str:
    """Pearson correlation per channel with our tensor (same grid), as a check that both do the same job."""
    if out.shape != ref.shape:
        return f"n/a (shape {list(out.shape)})"
    return " / ".join(f"{np.corrcoef(out[s].ravel(), ref[s].ravel())[0, 1]:.2f}" for s in range(ref.shape[0]))


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--index", type=int, default=DEFAULT_INDEX)
    parser.add_argument("--write", type=Path, help="replace the preprocess section of this file (BENCHMARKS.md)")
    parser.add_argument("--note", default="", help="one line added to the section (e.g. what else ran)")
    args = parser.parse_args(argv)
    command = " ".join(
        [
            ".venv/bin/python",
            "benchmarks/preprocess_bench.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    )
    load_start = _load()
    started = dt.datetime.now(dt.UTC)

    with tempfile.TemporaryDirectory() as tmp:
        variants, notes = prepare_variants(Path(tmp), args.seed, args.index)
        chains = {g: build_monai_chain(spec) for g, spec in GRIDS.items()}
        samples: dict[tuple[str, str, str], Samples] = {}
        outputs: dict[tuple[str, str, str], np.ndarray] = {}
        jobs: dict[tuple[str, str, str], Callable[[], tuple[np.ndarray, dict[str, float]]]] = {}
        for v in variants:
            for g, spec in GRIDS.items():
                jobs[(v.name, g, "mpmri")] = functools.partial(run_mpmri, v.dicom_dir, spec)
                jobs[(v.name, g, "monai")] = functools.partial(run_monai, chains[g], v.series_dirs)
        for key, fn in jobs.items():  # warm-up (imports, page cache, decoder plugins) and outputs
            outputs[key] = fn()[0]
            samples[key] = Samples()
        for r in range(args.rounds):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                for g in GRIDS:
                    methods = ("mpmri", "monai") if r % 2 == 0 else ("monai", "mpmri")
                    for m in methods:
                        _measure(jobs[(v.name, g, m)], samples[(v.name, g, m)])
    finished = dt.datetime.now(dt.UTC)
    load_end = _load()

    cores = _cpu_count()
    lines = [
        MARK_BEGIN,
        "## Preprocessing: DICOM study -> model tensor — `benchmarks/preprocess_bench.py`",
        "",
        "Written by the script (no hand edits). Synthetic study `mpmri synth` seed "
        f"{args.seed} index {args.index} (no patient data); both methods produce `[3, D, H, W]` on the same grid.",
        "",
        f"- Machine: {platform.node() or 'unknown'}, {cpu_model_name()} ({platform.machine()}),"
        f" {cores} cores available; "
        f"Python {platform.python_version()}, numpy {np.__version__}, SimpleITK {_version('SimpleITK')}, "
        f"MONAI {_version('monai')}, pydicom {_version('pydicom')}",
        f"- Date (UTC): {started:%Y-%m-%d %H:%M}–{finished:%H:%M}; command: `{command}`",
        f"- Load average (1 / 5 / 15 min) at the start: {load_start}; at the end: {load_end} "
        f"({cores} cores: above ~{cores - 1} other jobs shared the cores and absolute times are inflated; "
        "the interleaved ratios are the robust figures)",
        f"- Method: one warm-up per cell, then {args.rounds} rounds; each round runs every variant at both grids "
        "with both methods (variant order rotated, method order alternating). Ratio = MONAI wall / mpmri wall of "
        "the same round; median [q1, q3] (min–max) over rounds. mpmri reads the whole study folder (series "
        "selection included); MONAI reads three folders with the instances mpmri chose (the chosen series; of the "
        "multi-b DWI series only the chosen b-value).",
    ]
    if args.note:
        lines.append(f"- Note: {args.note}")
    lines += [
        "- Inputs: "
        + "; ".join(f"`{v.name}` {v.files} files, {v.megabytes:.1f} MB" for v in variants)
        + (f" ({'; '.join(notes)})" if notes else ""),
        "",
        "| variant | grid | mpmri wall ms, median [q1, q3] | MONAI wall ms, median [q1, q3] | speed-up vs MONAI, "
        "median [q1, q3] (min–max) | T2W/ADC/DWI corr. MONAI vs mpmri | mpmri = plain mpmri |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    ratios: dict[tuple[str, str], float] = {}
    for g in GRIDS:
        for v in variants:
            ours, theirs = samples[(v.name, g, "mpmri")], samples[(v.name, g, "monai")]
            per_round = [b / a for a, b in zip(ours.wall, theirs.wall)]
            rq1, rmed, rq3 = _quartiles(per_round)
            ratios[(v.name, g)] = rmed
            oq1, omed, oq3 = _quartiles(ours.wall)
            mq1, mmed, mq3 = _quartiles(theirs.wall)
            same = np.array_equal(outputs[(v.name, g, "mpmri")], outputs[("plain", g, "mpmri")])
            lines.append(
                f"| {v.name} | {g} | {omed * 1e3:.1f} [{oq1 * 1e3:.1f}, {oq3 * 1e3:.1f}] "
                f"| {mmed * 1e3:.1f} [{mq1 * 1e3:.1f}, {mq3 * 1e3:.1f}] "
                f"| **{rmed:.2f}x** [{rq1:.2f}, {rq3:.2f}] ({min(per_round):.2f}–{max(per_round):.2f}) "
                f"| {_agreement(outputs[(v.name, g, 'monai')], outputs[(v.name, g, 'mpmri')])} "
                f"| {'identical' if same else 'DIFFERENT'} |"
            )
    lines += [
        "",
        "Throughput of mpmri (median over rounds; CPU = process CPU time per study, all threads; "
        "studies/s per core = 1000 / CPU ms; cores per GPU = CPU ms / GPU ms, GPU figures given, not measured here: "
        + ", ".join(f"{k} {ms:g} ms/study" for k, ms in DEFAULT_GPU_MS.items())
        + "):",
        "",
        "| variant | grid | wall ms per study | CPU ms per study | studies/s per core | "
        + " | ".join(f"cores per GPU ({k})" for k in DEFAULT_GPU_MS)
        + " | mpmri read / decode / resample + normalize ms | MONAI CPU ms per study |",
        "|---|---|---:|---:|---:|" + "---:|" * len(DEFAULT_GPU_MS) + "---:|---:|",
    ]
    for g in GRIDS:
        for v in variants:
            ours = samples[(v.name, g, "mpmri")]
            wall_ms = statistics.median(ours.wall) * 1e3
            cpu_ms = statistics.median(ours.cpu) * 1e3
            lines.append(
                f"| {v.name} | {g} | {wall_ms:.1f} | {cpu_ms:.1f} | {1000.0 / cpu_ms:.1f} | "
                + " | ".join(f"{cpu_ms / ms:.1f}" for ms in DEFAULT_GPU_MS.values())
                + f" | {_stage(ours, 'read'):.1f} / {_stage(ours, 'decode'):.1f} / "
                + f"{_stage(ours, 'resample') + _stage(ours, 'normalize'):.1f}"
                + f" | {statistics.median(samples[(v.name, g, 'monai')].cpu) * 1e3:.1f} |"
            )
    lines += [
        "",
        "mpmri stage breakdown on `plain` (median ms over rounds; the channels run concurrently, and "
        "`resample` (incl. the FOV mask) / `normalize` split their wall time):",
        "",
    ]
    for g in GRIDS:
        st = samples[("plain", g, "mpmri")].stages
        keys = list(st[0])
        lines.append(f"- {g}: " + ", ".join(f"{k} {statistics.median(s[k] for s in st) * 1e3:.1f}" for k in keys))
    worst = min(ratios[(v.name, "default")] for v in variants)
    worst_real = min(ratios[(v.name, "realistic")] for v in variants)
    real_ms = statistics.median(samples[("plain", "realistic", "mpmri")].wall) * 1e3
    lines += [
        "",
        f"**Goal >= 3x faster than MONAI on every variant (default grid): {'met' if worst >= 3 else 'NOT met'}**, "
        f"lowest median ratio {worst:.2f}x (realistic grid: lowest {worst_real:.2f}x).",
        f"**Goal <= 80 ms per study at the realistic grid on {cores} cores: "
        f"{'met' if real_ms <= 80 else 'NOT met'} in this run**, plain files {real_ms:.1f} ms median wall "
        f"(load average {load_start} at the start, {load_end} at the end).",
        MARK_END,
    ]
    section = "\n".join(lines)
    print(section)
    if args.write is not None:
        _replace_section(args.write, section)
    return 0


def _version(module: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _replace_section(path: Path, section: str) -> None:
    text = path.read_text()
    begin, end = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
    path.write_text(text[:begin] + section + text[end:])


if __name__ == "__main__":
    raise SystemExit(main())
