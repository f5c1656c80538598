"""``mpmri demo``: the main job on the embedded default, through the analysis service.

synthetic study (DICOM) -> ``mpmri analyze`` (the gRPC client) -> analysis service -> Triton ensemble
(embedded CPU tritonserver) -> report.

Writes into ``--out`` (default ``out/demo``): the study's DICOM files, ``analysis/`` (what ``mpmri analyze``
writes: ``result.json``, ``seg.dcm``, ``sr.dcm``, ``overlay.png``), ``channels.png`` (the three normalized
channels, each titled with the series chosen for it; preprocessed locally for the picture only),
``report.json`` and ``report.txt``. The study is synthetic: the report puts the generator's ground truth next
to the result.
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
from preprocess_service.metrics import STAGES

log = logging.getLogger(__name__)

DEFAULT_SEED = 7
DEFAULT_INDEX = 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="synthetic study -> mpmri analyze -> service -> Triton ensemble -> report")
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
    p.set_defaults(func=run)


def _stage(name: str, t0: float) -> float:
    t1 = time.perf_counter()
    print(f"  [{t1 - t0:6.2f} s] {name}", flush=True)
    return t1


def run(args: argparse.Namespace) -> int:
    from export.pipeline import export_repository, repository_is_current
    from mpmri_client.cli import main as client_main
    from networks.checkpoint import DEFAULT_CHECKPOINT
    from preprocess_service.server import BackgroundServer
    from preprocess_service.settings import ServiceSettings
    from preprocessing.pipeline import preprocess_study
    from serving.embedded import EmbeddedTriton, free_ports
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

    if repository_is_current(checkpoint, repository):
        t = _stage(f"{repository} is current for {checkpoint.name} (manifest hashes match): not re-exported", t)
    else:
        export_repository(checkpoint, repository)
        t = _stage(f"exported {checkpoint.name} to {repository}", t)

    analysis = out / "analysis"
    # free ports: the demo must not collide with a Triton or a service already running
    http_port, grpc_port, metrics_port = free_ports(3)
    with EmbeddedTriton(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port) as triton:
        t = _stage(f"Triton ready (grpc {triton.grpc_url})", t)
        settings = ServiceSettings(port=0, metrics_port=-1, triton_url=triton.grpc_url, log_format="text")
        with BackgroundServer(settings) as service:
            target = f"127.0.0.1:{service.port}"
            t = _stage(f"analysis service ready (gRPC {target}, model from Triton)", t)
            print(f"  $ mpmri analyze {case_dir / 'dicom'} --server {target} --out {analysis}", flush=True)
            code = client_main(["analyze", str(case_dir / "dicom"), "--server", target, "--out", str(analysis)])
            if code != 0:
                return code
            t = _stage("mpmri analyze answered", t)
    t = _stage("service and Triton stopped", t)

    result = json.loads((analysis / "result.json").read_text())
    report = build_report(study.truth, result)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = format_report(report)
    (out / "report.txt").write_text(text)
    pre = preprocess_study(case_dir / "dicom")  # locally, for the channels picture only
    render_channels(pre.tensor, pre.meta, out / "channels.png")
    print(text, flush=True)
    print(
        f"wrote {out / 'report.txt'}, {out / 'channels.png'}, {analysis}/result.json, seg.dcm, sr.dcm, overlay.png",
        flush=True,
    )
    return 0


def build_report(truth: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The service's answer (``result.json``) and, since the study is synthetic, its ground truth."""
    return {
        "case_id": truth.get("case_id"),
        "cspca_probability": float(result["cspca_probability"]),
        "pirads_distribution": {
            str(c): float(p) for c, p in zip(contract.PIRADS_CATEGORIES, result["pirads_distribution"])
        },
        "pirads_score": int(result["pirads_score"]),
        "lesions": [
            {
                "center_lps_mm": [round(float(v), 1) for v in les["center_lps_mm"]],
                "volume_mm3": round(float(les["volume_ml"]) * 1000.0, 1),
                "likelihood": round(float(les["likelihood"]), 3),
                "pirads": int(les.get("pirads", 0)),
            }
            for les in result["lesions"]
        ],
        "series": {s["sequence"]: s["series_description"] for s in result["series"]},
        "warnings": result.get("warnings", []),
        "timings_s": result.get("timings_s", {}),
        "model": f"{result.get('model_name')} v{result.get('model_version')}",
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
            f"csPCa likelihood {les['likelihood']:.2f}   PI-RADS-like {les['pirads']}"
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
    if report.get("timings_s"):
        lines.append(
            f"  service stages (s)    {report['model']}: "
            + "  ".join(f"{k} {report['timings_s'][k]:.3f}" for k in STAGES if k in report["timings_s"])
        )
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
