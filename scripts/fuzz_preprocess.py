"""Longer fuzz run of the preprocessing on damaged DICOM headers (the suite runs a short, seeded one).

    python scripts/fuzz_preprocess.py --seconds 600 --seed 1 [--study synth|scanner]

Each case damages 1-3 files of a study (flipped header bytes, truncation, inserted or deleted bytes;
``preprocessing.testing.corrupt``) and preprocesses it from bytes. Defects: a crash (an exception that is
not a PreprocessError), a result whose geometry differs from the clean study's with nothing said
(no warning, nothing skipped), a file-level error that names no damaged file, or a case slower than 10 s.
Prints a summary and every defect (with the seed and the damage, so it can be replayed); exits 1 on any.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np

from preprocessing.pipeline import preprocess_study
from preprocessing.testing import fuzz_once, fuzz_study, to_bytes

DEFECTS = ("crash", "silent-geometry", "unnamed", "slow")


def _blobs(study: str) -> list[bytes]:
    if study == "small":
        return [to_bytes(ds) for ds in fuzz_study()]
    from synth.generator import SynthConfig, synthesize_study

    # scanner: realistic scanner headers on every object (nested, undefined-length sequences, private blocks)
    synth = synthesize_study(7, 0, SynthConfig(scanner_headers_every=1 if study == "scanner" else 2))
    return [to_bytes(ds) for datasets in synth.series.values() for ds in datasets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="stop after this long (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--study",
        choices=("small", "synth", "scanner"),
        default="small",
        help="small: 3x8 slices; synth: mpmri synth; scanner: mpmri synth with scanner headers on every object",
    )
    args = parser.parse_args(argv)
    blobs = _blobs(args.study)
    clean = preprocess_study(blobs)
    rng = np.random.default_rng(args.seed)
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    defects = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        outcome = fuzz_once(blobs, clean, rng)
        counts[outcome.kind] += 1
        if outcome.kind == "refused":
            errors[outcome.detail.split(":")[0]] += 1
        if outcome.kind in DEFECTS:
            defects.append(outcome)
            print(f"DEFECT {outcome.kind}: damage {list(outcome.damage)}: {outcome.detail[:300]}", flush=True)
    total = sum(counts.values())
    print(f"{total} damaged studies ({args.study}, seed {args.seed}, {args.seconds:g} s):")
    for kind, n in counts.most_common():
        print(f"  {kind:16s} {n}")
    print("refusals by error type:")
    for name, n in errors.most_common():
        print(f"  {name:28s} {n}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
