"""``mpmri synth``: write synthetic prostate mpMRI studies (DICOM + ground truth)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from synth.generator import SynthConfig, synthesize_study, write_study


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``synth`` subcommand."""
    p = subparsers.add_parser(
        "synth",
        help="write synthetic mpMRI studies with ground truth",
        description="Write OUT/<case_id>/dicom/<series>/*.dcm, ground_truth.json and lesions.nii.gz per case.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cases", type=int, default=4, help="number of studies (default 4)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="first study index (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from synth.generator import SynthError

    if args.cases < 1:
        raise SynthError(f"--cases must be >= 1, got {args.cases}")
    if args.seed < 0 or args.start < 0:
        raise SynthError("--seed and --start must be >= 0")
    config = SynthConfig()
    for index in range(args.start, args.start + args.cases):
        t0 = time.perf_counter()
        study = synthesize_study(args.seed, index, config)
        case_dir = write_study(study, args.out / study.case_id)
        truth = study.truth
        n_files = sum(len(v) for v in study.series.values())
        print(
            f"{study.case_id}: {len(study.series)} series, {n_files} files, {len(truth['lesions'])} lesion(s), "
            f"significant={truth['significant']}, max_pirads={truth['max_pirads']}, "
            f"{time.perf_counter() - t0:.2f} s -> {case_dir}",
            flush=True,
        )
    return 0
