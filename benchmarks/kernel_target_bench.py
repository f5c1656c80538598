"""Benchmark: the preprocessing kernels compiled for the host's CPU model against x86-64 ISA levels.

Since ``preprocessing.numba_target`` the kernels are compiled for the host's x86-64 ISA level, not its CPU
model (numba's default), because LLVM miscompiled them for AMD Zen 4/5 models. This measures what that costs.
Each target runs in its own process (numba fixes its target once per process), **interleaved**: every round
starts one process per target, the order rotating from round to round. A process compiles (or loads from
numba's cache) the kernels, runs :func:`preprocessing.kernel_check.check_kernels` (does the target compute the
kernels' definition?), then times one realistic-grid channel (24 x 256 x 256 voxels from a 30 x 384 x 384
float32 source, one thread): the general kernel on an oblique map and the separable one on a diagonal map,
best of 3 calls each. Run::

    .venv/bin/python benchmarks/kernel_target_bench.py [--rounds 7] [--write BENCHMARKS.md]

``--write`` replaces the section between ``<!-- kernel-target:begin -->`` and ``<!-- kernel-target:end -->``
(appended when absent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from preprocessing.numba_target import cpu_description

MARK_BEGIN, MARK_END = "<!-- kernel-target:begin -->", "<!-- kernel-target:end -->"

#: what one process measures (prints one JSON line)
CHILD = r"""
import json, time
import numpy as np
from contract import REALISTIC_GRID
from preprocessing import linear_resample as lr, numba_target
from preprocessing.kernel_check import KernelCheckError, check_kernels, _rotation

try:
    check_kernels()
    agrees = True
except KernelCheckError:
    agrees = False
d, h, w = REALISTIC_GRID.size_dhw
src = np.random.default_rng(0).normal(100, 30, size=(30, 384, 384)).astype(np.float32)
out = np.empty((d, h, w), np.float32)
inside = np.empty((d, h, w), np.bool_)
# offset = source index (i, j, k) of grid voxel 0; steps[grid axis, source axis]
maps = {
    "general": (lr._resample_general, np.array([70.0, 60.0, 2.0]), _rotation((0.1, 0.1, 1.0), 0.2)),
    "separable": (lr._resample_separable, np.array([64.3, 64.4, 3.25]), np.diag([1.0, 1.0, 1.0])),
}
ms = {}
for name, (kernel, offset, steps) in maps.items():
    kernel(src, offset, steps, 0.0, out, inside, 0, d)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        kernel(src, offset, steps, 0.0, out, inside, 0, d)
        times.append(time.perf_counter() - t)
    ms[name] = 1000 * min(times)
    ms[name + "_inside"] = float(inside.mean())
print(json.dumps({"target": numba_target.compiled_target(), "agrees": agrees, **ms}))
"""


def _targets() -> list[tuple[str, dict[str, str]]]:
    """``(label, environment)``: the host model (numba's default), then the ISA levels."""
    from llvmlite import binding as llvm

    host = llvm.get_host_cpu_name()
    return [
        (f"{host} (the host's model: numba's default)", {"NUMBA_CPU_NAME": host}),
        ("x86-64-v4 (AVX-512; chosen on this host)", {"NUMBA_CPU_NAME": "x86-64-v4", "NUMBA_CPU_FEATURES": ""}),
        ("x86-64-v3 (AVX2, FMA)", {"NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": ""}),
        ("generic (SSE2)", {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": ""}),
    ]


def _run(env: dict[str, str]) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env={**clean, **env}, capture_output=True, text=True, timeout=600, check=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{statistics.median(values):.1f} ({q[0]:.1f}–{q[2]:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--write", type=Path, help="replace the kernel-target section of this file")
    args = parser.parse_args(argv)
    command = " ".join(["benchmarks/kernel_target_bench.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    targets = _targets()
    for _, env in targets:  # compile once per target (numba's cache), outside the measurement
        _run(env)
    load_start = os.getloadavg()
    samples: dict[str, list[dict[str, object]]] = {label: [] for label, _ in targets}
    for r in range(args.rounds):
        shift = r % len(targets)
        for label, env in targets[shift:] + targets[:shift]:
            samples[label].append(_run(env))
    load_end = os.getloadavg()
    first = samples[targets[1][0]][0]  # an ISA-level run (the host model's may be wrong)
    lines = [
        MARK_BEGIN,
        "## Preprocessing kernels: the CPU model against ISA levels — `benchmarks/kernel_target_bench.py` (generated)",
        "",
        "Written by the script (no hand edits). One realistic-grid channel (24 x 256 x 256 voxels from a random 30 x"
        " 384 x 384 float32 source, one thread), best of 3 calls per process, one process per target and round,"
        f" {args.rounds} interleaved rounds; median (IQR) over rounds, ms. Machine: {platform.machine()}, CPU"
        f" {cpu_description()}, {os.cpu_count()} logical CPUs; load average {load_start[0]:.2f} at the start,"
        f" {load_end[0]:.2f} at the end; {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}."
        f" Command: `.venv/bin/python {command}`. Grid voxels inside the source:"
        f" {100 * float(first['general_inside']):.1f} % (oblique), {100 * float(first['separable_inside']):.1f} %"  # type: ignore[arg-type]
        " (diagonal).",
        "",
        "| numba target | kernels agree with their definition (`check_kernels`) | general kernel (oblique map)"
        " | separable kernel (diagonal map) |",
        "|---|---|---:|---:|",
    ]
    for label, rows in samples.items():
        agrees = "yes" if all(row["agrees"] for row in rows) else "**no**"
        general = _spread([float(row["general"]) for row in rows])  # type: ignore[arg-type]
        separable = _spread([float(row["separable"]) for row in rows])  # type: ignore[arg-type]
        lines.append(f"| {label} | {agrees} | {general} | {separable} |")
    lines.append(MARK_END)
    section = "\n".join(lines)
    print(section)
    if args.write is not None:
        text = args.write.read_text()
        if MARK_BEGIN in text:
            begin, end = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
            text = text[:begin] + section + text[end:]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
