"""``mpmri preprocess DICOM_DIR --out OUT_DIR``: write the model-grid channels as NIfTI plus meta.json."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from contract import SEQUENCES, contract_dict
from preprocessing.errors import PreprocessError
from preprocessing.pipeline import PreprocessedStudy, PreprocessSettings, preprocess_study

logger = logging.getLogger(__name__)


def write_outputs(result: PreprocessedStudy, out_dir: Path, settings: PreprocessSettings) -> list[Path]:
    """Write ``<seq>.nii.gz`` for every sequence (grid geometry; missing ones hold the fill value) and meta.json."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for seq in SEQUENCES:
            path = out_dir / f"{seq}.nii.gz"
            sitk.WriteImage(result.channel_image(seq), str(path), useCompression=True)
            written.append(path)
        meta: dict[str, Any] = dict(result.meta)
        meta["contract"] = contract_dict(settings.grid)
        meta_path = out_dir / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        written.append(meta_path)
    except (OSError, RuntimeError) as err:
        raise PreprocessError(f"cannot write outputs to {out_dir}: {str(err).splitlines()[0]}") from err
    return written


def _run(args: argparse.Namespace) -> int:
    settings = PreprocessSettings(
        rules_path=args.rules,
        max_instances=args.max_instances,
        study_instance_uid=args.study_uid,
    )
    result = preprocess_study(Path(args.dicom_dir), settings)
    write_outputs(result, Path(args.out), settings)
    present = [s for s, ok in result.meta["availability"].items() if ok]
    missing = [s for s, ok in result.meta["availability"].items() if not ok]
    print(
        f"wrote {args.out}: present {', '.join(present)}"
        + (f"; missing {', '.join(missing)}" if missing else "")
        + f" ({result.meta['timings_s']['total']:.2f} s)"
    )
    return 0


def register(subparsers: Any) -> None:
    """Add the ``preprocess`` subcommand."""
    p = subparsers.add_parser(
        "preprocess",
        help="DICOM study -> model-grid NIfTI channels + meta.json",
        description=__doc__,
    )
    p.add_argument("dicom_dir", metavar="DICOM_DIR", help="folder with the study's DICOM files (searched recursively)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--rules", type=Path, default=None, help="series rules JSON (default: packaged series_rules.json)")
    p.add_argument("--study-uid", default=None, help="StudyInstanceUID to use when the folder holds several studies")
    p.add_argument("--max-instances", type=int, default=PreprocessSettings.max_instances, help="refuse larger inputs")
    p.set_defaults(func=_run)
