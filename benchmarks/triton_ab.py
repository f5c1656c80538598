"""A/B of Triton serving settings: the in-process onnxruntime chain and one server per variant, interleaved.

Every variant gets its own ``tritonserver`` (own ports, own copy of the repository with the variant's
generated configs); all servers run at the same time but only one is measured at any moment (idle
servers sleep: onnxruntime spinning is off). Each round measures the chain and each variant for
``--requests`` batch-1 requests (perf_analyzer, concurrency 1), rotating the order; the result per variant
is the median over rounds of p50(variant) / p50(chain), so slow bursts of the shared machine cancel out.

    .venv/bin/python benchmarks/triton_ab.py --repository build/e/repo --variants tuned,python_shm_1mb,no_batcher
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract import ENSEMBLE_MODEL  # noqa: E402
from export.repository import (  # noqa: E402
    ALL_MODELS,  # noqa: E402
    DEFAULT_SETTINGS,
    MODEL_VERSION,
    NETWORK_MODELS,
    ONNX_FILENAME,
    RepositorySettings,
    write_configs,
)
from serving.embedded import PYTHON_SHM_BYTE_SIZE, EmbeddedTriton, free_ports  # noqa: E402
from serving.perf import (  # noqa: E402
    BenchSettings,
    InprocessChainSampler,
    LatencySampler,
    PerfAnalyzerSampler,
    TritonShmSampler,
    measure_interleaved,
    server_stats_delta_ms,
    server_stats_snapshot,
    settled_stats_snapshot,
    study_tensors,
    write_input_data,
)
from serving.triton_env import REPO_ROOT  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """One server setup: generated configs, extra tritonserver flags / environment, client shared memory."""

    settings: RepositorySettings = DEFAULT_SETTINGS
    python_shm_byte_size: int | None = PYTHON_SHM_BYTE_SIZE
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    shared_memory: str = "system"
    outputs: tuple[str, ...] | None = None


MB = 1 << 20
MALLOC_NO_MMAP = (("GLIBC_TUNABLES", f"glibc.malloc.mmap_threshold={32 * MB}:glibc.malloc.trim_threshold={256 * MB}"),)
NO_BATCHER = dataclasses.replace(DEFAULT_SETTINGS, cpu_dynamic_batching=False)
#: "tuned" = the committed defaults (generated configs + EmbeddedTriton defaults); others change one thing
VARIANTS: dict[str, Callable[[], Variant]] = {
    "tuned": lambda: Variant(),
    "python_shm_1mb": lambda: Variant(python_shm_byte_size=None),
    "no_client_shm": lambda: Variant(shared_memory="none"),
    "no_batcher": lambda: Variant(settings=NO_BATCHER),
    "malloc_no_mmap": lambda: Variant(extra_env=MALLOC_NO_MMAP),
    # thread count changes both sides: the variant gets its own in-process chain ("chain_<variant>")
    "intra_op_1": lambda: Variant(settings=dataclasses.replace(DEFAULT_SETTINGS, cpu_intra_op_threads=1)),
}


def variant_repository(source: Path, target: Path, settings: RepositorySettings) -> Path:
    """``target``: the variant's generated configs + the ONNX files of ``source``."""
    if target.exists():
        shutil.rmtree(target)
    write_configs(target, settings=settings)
    for model in NETWORK_MODELS:
        shutil.copy2(source / model / MODEL_VERSION / ONNX_FILENAME, target / model / MODEL_VERSION / ONNX_FILENAME)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="exported repository (ONNX files)")
    parser.add_argument("--variants", default="tuned,python_shm_1mb", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=25, help="requests per sampler per round")
    parser.add_argument(
        "--mode",
        choices=("alternate", "blocks"),
        default="alternate",
        help="alternate: request by request via Python gRPC + system shm; blocks: perf_analyzer blocks",
    )
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    work = REPO_ROOT / "build" / "ab"
    tensors = study_tensors(None)
    input_data = write_input_data(work / "ensemble_input.json", ENSEMBLE_MODEL, tensors)
    samplers: dict[str, LatencySampler] = {"chain": InprocessChainSampler(args.repository, tensors)}
    chain_threads = samplers["chain"].threads  # type: ignore[attr-defined]
    server_urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            variant = VARIANTS[name]()
            repo = variant_repository(args.repository, work / "repos" / name, variant.settings)
            http_port, grpc_port, metrics_port = free_ports(3)
            server = EmbeddedTriton(
                repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                build_dir=work / "triton", python_shm_byte_size=variant.python_shm_byte_size,
                extra_args=variant.extra_args, extra_env=dict(variant.extra_env),
            )  # fmt: skip
            server.log_path = work / "logs" / f"{name}.log"
            if variant.settings.cpu_intra_op_threads != chain_threads:
                samplers[f"chain_{name}"] = InprocessChainSampler(repo, tensors)  # same threads as the variant
            stack.enter_context(server)
            server_urls[name] = server.grpc_url
            if args.mode == "alternate":
                sampler = TritonShmSampler(server.grpc_url, tensors, outputs=variant.outputs)
                stack.callback(sampler.close)
                samplers[name] = sampler
            else:
                bench = dataclasses.replace(BenchSettings(), shared_memory=variant.shared_memory)
                samplers[name] = PerfAnalyzerSampler(server.grpc_url, ENSEMBLE_MODEL, input_data, bench, work / name)
        urls = dict(server_urls)
        before = {name: settled_stats_snapshot(url, ALL_MODELS) for name, url in urls.items()}
        result = measure_interleaved(
            samplers, "chain", args.rounds, args.requests, alternate=args.mode == "alternate", progress=print
        )
        breakdown = {
            name: server_stats_delta_ms(before[name], server_stats_snapshot(url, ALL_MODELS))
            for name, url in urls.items()
        }
    first = names[0]
    print(f"\n{'variant':<18} {'p50 ms':>7} {'p90 ms':>7} {'ratio/chain (median [q1, q3])':>32} {'vs ' + first:>10}")
    for label in result.labels:
        pooled, summary = result.pooled(label), result.ratio_summary(label)
        vs_first = statistics.median(
            a / b for a, b in zip(result.round_p50s(label), result.round_p50s(first), strict=True)
        ) if not label.startswith("chain") else float("nan")  # fmt: skip
        print(
            f"{label:<18} {pooled['p50_ms']:7.2f} {pooled['p90_ms']:7.2f} "
            f"{summary['median']:14.3f} [{summary['q1']:.3f}, {summary['q3']:.3f}] {vs_first:10.3f}"
        )
    print("\nserver-side mean ms per request (queue / compute input / infer / output | success)")
    for name, models in breakdown.items():
        for model, row in models.items():
            print(
                f"{name:<18} {model:<15} {row['queue']:6.3f} {row['compute_input']:6.3f} "
                f"{row['compute_infer']:7.3f} {row['compute_output']:6.3f} | {row['success']:7.3f}"
            )
    for label in result.labels:
        if label.startswith("chain_"):
            own = label.removeprefix("chain_")
            ratios = sorted(a / b for a, b in zip(result.round_p50s(own), result.round_p50s(label), strict=True))
            print(f"{own} / its own chain ({label}): median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
