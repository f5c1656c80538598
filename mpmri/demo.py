"""``mpmri demo``: the main job on the embedded default.

synthetic study (DICOM) -> preprocessing -> Triton ensemble (embedded CPU tritonserver) -> report.

Writes into ``--out`` (default ``out/demo``): the study's DICOM files, ``channels.png`` (the three
normalized channels side by side, each titled with the series chosen for it), ``overlay.png`` (fused
localization map on T2W), ``report.json`` and ``report.txt``. The study is synthetic: the report puts the
generator's ground truth next to the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

import contract

log = logging.getLogger(__name__)

DEFAULT_SEED = 7
DEFAULT_INDEX = 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="synthetic study -> preprocessing -> Triton ensemble -> report")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="synthetic study seed")
    p.add_argument("--index", type=int, default=DEFAULT_INDEX, help="synthetic study index for that seed")
    p.add_argument("--checkpoint", type=Path, default=None, help="training checkpoint (default: shipped CPU one)")
    p.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository to build and serve (default: OUT/model_repository)",
    )
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.set_defaults(func=run)


def _stage(name: str, t0: float) -> float:
    t1 = time.perf_counter()
    print(f"  [{t1 - t0:6.2f} s] {name}", flush=True)
    return t1


def run(args: argparse.Namespace) -> int:
    from export.pipeline import export_repository, repository_is_current
    from networks.checkpoint import DEFAULT_CHECKPOINT
    from postprocessing.candidates import extract_candidates
    from preprocessing.pipeline import preprocess_study
    from serving.embedded import EmbeddedTriton, free_port
    from serving.triton_client import EnsembleClient
    from synth.generator import synthesize_study, write_study

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoint: Path = args.checkpoint or DEFAULT_CHECKPOINT
    repository: Path = args.repository or (out / "model_repository")
    t = time.perf_counter()
    print("mpmri demo (synthetic study; no patient data)", flush=True)

    study = synthesize_study(args.seed, args.index)
    case_dir = write_study(study, out / study.case_id)
    t = _stage(f"synthetic study {study.case_id} written to {case_dir}", t)

    pre = preprocess_study(case_dir / "dicom")
    t = _stage(f"preprocessed to {list(pre.tensor.shape)} on the model grid", t)
    render_channels(pre.tensor, pre.meta, out / "channels.png")

    if repository_is_current(checkpoint, repository):
        t = _stage(f"{repository} is current for {checkpoint.name} (manifest hashes match): not re-exported", t)
    else:
        export_repository(checkpoint, repository)
        t = _stage(f"exported {checkpoint.name} to {repository}", t)

    # free ports: the demo must not collide with a Triton (or anything else) already on 8000-8002
    with EmbeddedTriton(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        t = _stage(f"Triton ready (grpc {server.grpc_url})", t)
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        with EnsembleClient(url, protocol=args.protocol) as client:
            outputs = client.infer(pre.tensor, pre.availability)
        t = _stage(f"ensemble {contract.ENSEMBLE_MODEL} answered over {args.protocol}", t)
    t = _stage("Triton stopped", t)

    fused = np.asarray(outputs["fused_map"])[0]  # unbatched request: [1, D, H, W] -> [D, H, W]
    candidates, _ = extract_candidates(fused, pre.geometry)
    report = build_report(study.truth, pre.meta, outputs, candidates)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = format_report(report)
    (out / "report.txt").write_text(text)
    render_overlay(pre.tensor, fused, out / "overlay.png")
    print(text, flush=True)
    print(f"wrote {out / 'report.txt'}, {out / 'channels.png'}, {out / 'overlay.png'}", flush=True)
    return 0


def build_report(
    truth: dict[str, Any], meta: dict[str, Any], outputs: dict[str, np.ndarray], candidates: list[Any]
) -> dict[str, Any]:
    """Served result (and, since the study is synthetic, its ground truth) as JSON-serializable data."""
    prob = float(np.asarray(outputs["cspca_probability"]).reshape(-1)[0])
    dist = np.asarray(outputs["pirads_distribution"]).reshape(-1)
    return {
        "case_id": truth.get("case_id"),
        "cspca_probability": prob,
        "pirads_distribution": {str(c): float(p) for c, p in zip(contract.PIRADS_CATEGORIES, dist)},
        "pirads_score": int(contract.PIRADS_CATEGORIES[int(np.argmax(dist))]),
        "lesions": [
            {
                "center_lps_mm": [round(float(v), 1) for v in c.center_lps_mm],
                "volume_mm3": round(float(c.volume_mm3), 1),
                "likelihood": round(float(c.likelihood), 3),
            }
            for c in candidates
        ],
        "series": {seq: info.get("description") for seq, info in meta.get("series", {}).items() if info},
        "warnings": meta.get("warnings", []),
        "ground_truth": {
            "significant": truth.get("significant"),
            "max_pirads": truth.get("max_pirads"),
            "lesions": [
                {k: les[k] for k in ("center_lps_mm", "diameter_mm", "significant", "pirads", "kind") if k in les}
                for les in truth.get("lesions", [])
            ],
        },
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "",
        f"Study {report['case_id']}  (synthetic)",
        f"  csPCa probability     {report['cspca_probability']:.3f}",
        f"  PI-RADS-like score    {report['pirads_score']}   "
        + "  ".join(f"{k}:{v:.2f}" for k, v in report["pirads_distribution"].items()),
        "  series used           " + "; ".join(f"{k}={v}" for k, v in report["series"].items()),
        f"  lesion candidates     {len(report['lesions'])}",
    ]
    for i, les in enumerate(report["lesions"], 1):
        x, y, z = les["center_lps_mm"]
        lines.append(
            f"    {i}. LPS ({x:7.1f}, {y:7.1f}, {z:7.1f}) mm   {les['volume_mm3']:8.1f} mm3   "
            f"likelihood {les['likelihood']:.2f}"
        )
    gt = report["ground_truth"]
    lines.append(f"  ground truth          significant={gt['significant']}  max PI-RADS={gt['max_pirads']}")
    for i, les in enumerate(gt["lesions"], 1):
        x, y, z = les["center_lps_mm"]
        lines.append(
            f"    {i}. LPS ({x:7.1f}, {y:7.1f}, {z:7.1f}) mm   {les['diameter_mm']:5.1f} mm   "
            f"{les['kind']}  significant={les['significant']}  PI-RADS {les['pirads']}"
        )
    for w in report["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines) + "\n"


def render_channels(tensor: np.ndarray, meta: dict[str, Any], path: Path) -> Path:
    """PNG of the normalized channels ``[S, D, H, W]`` (middle slice) side by side, titled with the series used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = tensor.shape[1] // 2
    fig, axes = plt.subplots(1, tensor.shape[0], figsize=(4 * tensor.shape[0], 4.4))
    for s, name in enumerate(contract.SEQUENCES):
        info = meta.get("series", {}).get(name) or {}
        desc = info.get("description") or "missing"
        b = f", b={info['b_value']:.0f}" if info.get("b_value") else ""
        axes[s].imshow(tensor[s, k], cmap="gray", vmin=0.0, vmax=1.0)
        axes[s].set_title(f"{name.upper()}: {desc}{b}", fontsize=9)
        axes[s].axis("off")
    fig.suptitle(f"normalized channels on the model grid, slice {k} (synthetic study)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_overlay(tensor: np.ndarray, fused_map: np.ndarray, path: Path) -> Path:
    """PNG: fused localization map ``[D, H, W]`` over T2W on the slice of its maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(np.unravel_index(int(np.argmax(fused_map)), fused_map.shape)[0])
    t2w = tensor[contract.sequence_index("t2w"), k]
    fig, ax = plt.subplots(1, 2, figsize=(8, 4.4))
    ax[0].imshow(t2w, cmap="gray", vmin=0.0, vmax=1.0)
    ax[0].set_title(f"T2W, slice {k}", fontsize=9)
    ax[1].imshow(t2w, cmap="gray", vmin=0.0, vmax=1.0)
    ax[1].imshow(np.ma.masked_less(fused_map[k], 0.05), cmap="hot", vmin=0.0, vmax=1.0, alpha=0.6)
    ax[1].set_title(f"fused localization map (max {float(fused_map.max()):.2f})", fontsize=9)
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
