"""Latency of the network chain (localization -> map fusion -> classification + candidate extraction).

Exports the three networks of a checkpoint (or fresh networks of a profile) with the project's ONNX
settings (:func:`networks.models.export_kwargs`) and times one synthetic study (batch 1, preprocessed
once up front) with onnxruntime on ``--threads`` CPU threads, plus torch eager for comparison.
Preprocessing is not included (see benchmarks/preprocess_bench.py).

    .venv/bin/python benchmarks/networks_latency.py --checkpoint checkpoints/cpu_default.pt --threads 2
    .venv/bin/python benchmarks/networks_latency.py --profile gpu --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from contract import CLASSIFICATION_MODEL, FUSION_MODEL, LOCALIZATION_MODEL
from networks import build_networks, example_inputs, export_kwargs, load_checkpoint
from postprocessing.lesion_scoring import scorer_from_metadata
from postprocessing.report import build_findings


def _times(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "min_ms": round(1000 * ordered[0], 2),
        "median_ms": round(1000 * statistics.median(ordered), 2),
        "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--study-seed", type=int, default=9001, help="synthetic study used as input")
    parser.add_argument("--study-index", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None, help="also write the marked section of this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nets, meta = load_checkpoint(args.checkpoint) if args.checkpoint else (build_networks(args.profile).eval(), {})
    scorer = scorer_from_metadata(meta)  # the checkpoint's lesion scorer, applied as the service applies it

    # a real (synthetic) study, so the fused map has lesions and candidate extraction does real work
    from preprocessing.pipeline import PreprocessSettings, preprocess_study
    from synth.generator import synthesize_study

    series = synthesize_study(args.study_seed, args.study_index).series
    study = preprocess_study(series, PreprocessSettings(grid=nets.grid))  # the checkpoint's grid
    images = torch.from_numpy(study.tensor[None])
    availability = torch.from_numpy(study.availability[None])
    geometry = study.geometry

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    # as served (export.repository: spinning off): with spinning on, the idle threads of one session keep the
    # cores busy while the next session of the chain runs, and the chain measured twice the sum of its steps
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in nets.modules().items():
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(module, example_inputs(name), str(path), **export_kwargs(name))
            sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    img, av = images.numpy(), availability.numpy()
    state: dict[str, np.ndarray] = {}

    def loc() -> None:
        state["maps"] = sessions[LOCALIZATION_MODEL].run(None, {"images": img})[0]

    def fus() -> None:
        state["fused"] = sessions[FUSION_MODEL].run(
            None, {"sequence_maps": state["maps"], "availability": av, "images": img}
        )[0]

    def cls() -> None:
        session = sessions[CLASSIFICATION_MODEL]
        values = session.run(None, {"images": img, "fused_map": state["fused"]})
        state["classification"] = {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}

    def cand() -> int:  # what the service does with the outputs (candidates per contract.CandidateSettings)
        outputs = {"sequence_maps": state["maps"], "fused_map": state["fused"], **state["classification"]}
        findings = build_findings(outputs, geometry, scorer=scorer, images=img[0], availability=av[0])
        return len(findings.lesions)

    def chain() -> None:
        loc()
        fus()
        cls()
        cand()

    def torch_chain() -> None:
        with torch.no_grad():
            nets(images, availability)

    result = {
        "profile": nets.profile.name,
        "threads": args.threads,
        "study": f"synth seed {args.study_seed} index {args.study_index}",
        "parameters": sum(p.numel() for p in nets.parameters()),
        "onnxruntime": {
            "localization": _summary(_times(loc, args.repeats)),
            "map_fusion": _summary(_times(fus, args.repeats)),
            "classification": _summary(_times(cls, args.repeats)),
            "candidates": _summary(_times(cand, args.repeats)),
            "chain_with_candidates": _summary(_times(chain, args.repeats)),
        },
        "torch_eager_chain": _summary(_times(torch_chain, args.repeats)),
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
    }
    result["candidates_found"] = cand()
    print(json.dumps(result, indent=2))
    if args.write is not None:
        _write_section(args.write, result, args)


MARK_BEGIN, MARK_END = "<!-- networks:latency:begin -->", "<!-- networks:latency:end -->"


def _write_section(path: Path, result: dict, args: argparse.Namespace) -> None:  # type: ignore[type-arg]
    """Replace (or append) the marked latency section of ``path`` with this run's figures."""
    import datetime as dt
    import os
    import platform

    one, five, _ = os.getloadavg()
    cmd = (
        f"benchmarks/networks_latency.py --checkpoint {args.checkpoint} --profile {args.profile} "
        f"--threads {args.threads} --repeats {args.repeats} --write {path}"
    )
    ort_rows = result["onnxruntime"]
    lines = [
        MARK_BEGIN,
        "## Network chain latency — `benchmarks/networks_latency.py` (generated)",
        "",
        f"One preprocessed synthetic study ({result['study']}), batch 1, onnxruntime {result['onnxruntime_version']}"
        f" CPU, {args.threads} intra-op threads (spinning off, as served), {args.repeats} repeats after a warm-up;"
        " profile"
        f" {result['profile']} ({result['parameters']:,} parameters). Machine: {platform.machine()},"
        f" {os.cpu_count()} logical CPUs, load average {one:.2f} / {five:.2f} at the end;"
        f" {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Command: `{cmd}`.",
        "",
        "| step | min ms | median ms | p90 ms |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "localization": "localization (3 sequences)",
        "map_fusion": "map fusion (per-voxel gate)",
        "classification": "classification (score U-Net)",
        "candidates": "findings: candidates (fused-map + DWI-map blobs) + the lesion scorer (as served)",
        "chain_with_candidates": "whole chain incl. candidates",
    }
    for key, label in labels.items():
        row = ort_rows[key]
        lines.append(f"| {label} | {row['min_ms']} | {row['median_ms']} | {row['p90_ms']} |")
    eager = result["torch_eager_chain"]
    lines += ["", f"torch eager, whole chain without candidates: median {eager['median_ms']} ms.", MARK_END]
    from serving.perf import update_benchmarks_md

    update_benchmarks_md(path, "\n".join(lines), MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
