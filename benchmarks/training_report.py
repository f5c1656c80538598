"""The training sections of ``BENCHMARKS.md``, generated from a finished run (never edited by hand).

Reads ``RUN/history.csv`` and the run's final checkpoint metadata (configuration, wall clock, machine load,
calibration) and replaces the run's marked section: ``<!-- training:begin/end -->`` for the shipped CPU profile,
``<!-- training-<profile>:begin/end -->`` for another profile (the GPU profile, trained on a GPU machine):

    .venv/bin/python benchmarks/training_report.py --run build/runs/cpu_default --write BENCHMARKS.md
    .venv/bin/python benchmarks/training_report.py --run build/runs/gpu_realistic --write BENCHMARKS.md

All figures are on synthetic studies (``mpmri synth``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
from pathlib import Path
from typing import Any

from networks.checkpoint import load_checkpoint
from training.report import scorer_model_words
from training.train import PHASES

MARK_BEGIN, MARK_END = "<!-- training:begin -->", "<!-- training:end -->"


def markers(profile: str, section: str | None = None) -> tuple[str, str]:
    """The section markers of a run of ``profile`` (the CPU profile keeps the original ``training`` section), or of
    an explicitly named ``section`` (e.g. ``reproduction``: a rerun of the shipped recipe from an empty cache)."""
    name = section or (None if profile == "cpu" else profile)
    if name is None:
        return MARK_BEGIN, MARK_END
    return f"<!-- training-{name}:begin -->", f"<!-- training-{name}:end -->"


def _title(config: dict[str, Any]) -> str:
    if config["profile"] == "cpu":
        return "## Training: the shipped CPU checkpoint — `make checkpoint` / `mpmri train` (generated)"
    return (
        f"## Training: the {config['profile']} profile at the {config.get('grid', 'default')} grid —"
        " `scripts/train_gpu_profile.sh` / `mpmri train` (generated)"
    )


def _machine_words(invocation: dict[str, Any]) -> str:
    device = invocation.get("device", "cpu")
    where = platform.machine() if device == "cpu" else f"{device} GPU (the device machine)"
    words = f"{where}, {invocation.get('cpus')} logical CPUs, torch threads {invocation.get('threads')}"
    if invocation.get("cpu_model"):  # recorded since the CPU-target fix (preprocessing.numba_target)
        words += f"; CPU {invocation['cpu_model']}, preprocessing kernels compiled for {invocation['numba_target']}"
    return words


def _load_words(invocation: dict[str, Any]) -> str:
    start, end = invocation.get("load_average_1_5_15_start"), invocation.get("load_average_1_5_15_end")
    return (
        f"load average at start {start}, at end {end} (1 / 5 / 15 min; at the start, above"
        f" {invocation.get('cpus')} would mean other jobs shared the cores)."
    )


def _command(config: dict[str, Any]) -> str:
    epochs = config["epochs"]
    device = config.get("device", "cpu")
    on_device = "" if device == "cpu" else f" --device {device} --loader-workers {config.get('loader_workers', 0)}"
    return (
        f"mpmri train --profile {config['profile']} --grid {config.get('grid', 'default')} --cases {config['cases']}"
        f" --val-cases {config['val_cases']}{_calibration_flag(config)} --data-seed {config['data_seed']}"
        f" --epochs-localization {epochs['localization']} --epochs-classification {epochs['classification']}"
        f" --epochs-joint {epochs['joint']}{_fused_loss_flag(config)} --seed {config['seed']}"
        f" --threads {config['threads']} --batch-size {config['batch_size']}{on_device}"
    )


def _fused_loss_flag(config: dict[str, Any]) -> str:
    return "" if config.get("fused_loss_trains_localization", True) else " --fused-loss-trains-fusion-only"


def _calibration_flag(config: dict[str, Any]) -> str:
    extra = int(config.get("calibration_cases", 0))
    scorer = config.get("scorer_cases")
    recalibration = int(config.get("recalibration_cases", 0))
    return (
        (f" --calibration-cases {extra}" if extra else "")
        + ("" if scorer is None else f" --scorer-cases {int(scorer)}")
        + (f" --recalibration-cases {recalibration}" if recalibration else "")
    )


def _data_words(config: dict[str, Any], data: dict[str, Any]) -> str:
    extra = int(config.get("calibration_cases", 0))
    text = (
        f"cases 0–{config['cases'] - 1}: {data['train_cases']} train, {data['val_cases']} validation (per-epoch"
        " validation and the calibration)"
    )
    if extra:
        last = config["cases"] + extra - 1
        text += f"; cases {config['cases']}–{last}: {extra} calibration-only (never trained on, never used to select)"
    scorer = config.get("scorer_cases")
    if scorer:
        first = config["cases"] + extra
        text += f"; cases {first}–{first + int(scorer) - 1}: {scorer} scorer-only (the lesion scorer's fit alone)"
    recalibration = int(config.get("recalibration_cases", 0))
    if recalibration:
        first = config["cases"] + extra + int(scorer or 0)
        text += (
            f"; cases {first}–{first + recalibration - 1}: {recalibration} recalibration-only (the scorer's"
            " study-level Platt map alone)"
        )
    return text + "."


def _cache_words(invocation: dict[str, Any]) -> str:
    built, seconds = invocation.get("cache_cases_built"), float(invocation.get("cache_seconds") or 0.0)
    if built is None:
        return "cache build not recorded (run made before it was)"
    if built == 0:
        return "cache already built"
    return f"including building {built} cases of the cache ({seconds / 60:.1f} min)"


def render(run_dir: Path, section: str | None = None, label: str | None = None) -> str:
    """The markdown section (markers included) for the finished run in ``run_dir``."""
    with open(run_dir / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    _, meta = load_checkpoint(run_dir / "final.pt")
    training = meta["training"]
    config = training["config"]
    invocation = training.get("invocation", {})
    calibration = meta.get("calibration", {})
    wall = invocation.get("wall_seconds")
    begin, end = markers(config["profile"], section)
    recipe = "`make checkpoint`" if config["profile"] == "cpu" else "`scripts/train_gpu_profile.sh`"
    lines = [
        begin,
        _title(config) + (f" — {label}" if label else ""),
        "",
        "Generated by `benchmarks/training_report.py` from the run folder; **synthetic studies only** (`mpmri synth`,"
        " no patient data).",
        "",
        f"- Command: `{_command(config)}` ({recipe}).",
        f"- Data: synthetic seed {training['data']['data_seed']} (generator in `ground_truth.json`),"
        f" {_data_words(config, training['data'])}",
        f"- Machine: {_machine_words(invocation)}; {_load_words(invocation)}",
        f"- Wall clock of the training invocation: **{wall / 60:.1f} min**, {_cache_words(invocation)}; sum of epoch"
        f" times {training.get('seconds')} s."
        if wall
        else "- Wall clock: –",
        f"- Checkpoint created {meta.get('created_utc')}; report written"
        f" {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "| phase | epochs | seconds | last train loss | last val loss | val Dice (fused) | val AUROC"
        " | val PI-RADS acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in PHASES:
        rows = [r for r in history if r["phase"] == phase]
        if not rows:
            continue
        last = rows[-1]
        seconds = sum(float(r["seconds"]) for r in rows)
        lines.append(
            f"| {phase} | {len(rows)} | {seconds:.0f} | {float(last['train_loss']):.4f} | {float(last['val_loss']):.4f}"
            f" | {float(last['val_dice']):.3f} | {float(last['val_auroc']):.3f}"
            f" | {float(last['val_pirads_accuracy']):.3f} |"
        )
    thresholds = calibration.get("score_thresholds")
    if thresholds:
        lines += [
            "",
            f"Category thresholds ({calibration['data']}, {calibration['cases']} synthetic studies; ordinal maximum"
            f" likelihood on the raw highest score): {', '.join(f'{t:.3f}' for t in thresholds['thresholds'])}, mapped"
            f" onto the cut points {', '.join(f'{c:g}' for c in thresholds['maps_to_cutpoints'])}; negative"
            f" log-likelihood of the study categories {thresholds['nll_before']:.1f} before,"
            f" {thresholds['nll_after']:.1f} after (in-sample).",
        ]
    if "slope" in calibration:
        lines += [
            "",
            f"Calibration ({calibration['data']}, {calibration['cases']} synthetic studies): Platt slope"
            f" {calibration['slope']:.3f}, intercept {calibration['intercept']:.3f}; Brier on those studies"
            f" {calibration['brier_before']:.3f} before, {calibration['brier_after']:.3f} after (in-sample: the"
            " held-out figures are in the evaluation sections).",
        ]
    elif calibration:
        lines += ["", f"Calibration skipped: {calibration.get('skipped')}."]
    scorer = (meta.get("lesion_scoring") or {}).get("fitted_on")
    if scorer:
        lines += [
            "",
            f"Lesion scorer ({scorer.get('data')}): {len(meta['lesion_scoring']['trees'])} boosted trees on"
            f" {scorer.get('candidates')} candidates ({scorer.get('cspca_candidates')} on csPCa lesions) of"
            f" {scorer.get('studies')} studies in {scorer.get('study_passes')} passes with all and with fewer"
            " sequences"
            + scorer_model_words(scorer)
            + (
                f", {'fitted and recalibrated' if scorer.get('recalibration') else 'fitted'} in"
                f" {invocation['lesion_scorer_seconds'] / 60:.1f} min of the wall clock"
                if invocation.get("lesion_scorer_seconds")
                else ""
            )
            + "; its held-out figures are in the evaluation sections.",
        ]
    lines.append(end)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("build/runs/cpu_default"))
    parser.add_argument("--write", type=Path, default=None, help="replace the marked section of this file")
    parser.add_argument("--section", default=None, help="own section name (markers training-NAME), e.g. reproduction")
    parser.add_argument("--label", default=None, help="added to the section title")
    args = parser.parse_args(argv)
    section = render(args.run, args.section, args.label)
    print(section)
    if args.write is not None:
        from serving.perf import update_benchmarks_md

        lines = section.splitlines()
        update_benchmarks_md(args.write, section, lines[0], lines[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
