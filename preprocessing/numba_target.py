"""The CPU model numba compiles the preprocessing kernels for: an x86-64 ISA level, not the host's model.

By default numba compiles for the host's CPU model (``llvmlite.binding.get_host_cpu_name()``), with that
model's scheduling and vectorization choices. On AMD Zen 4 and Zen 5 hosts (``znver4``, ``znver5``; measured
with numba 0.68.1 / llvmlite 0.50.0, LLVM 22.1) those choices miscompile the resampling kernels: the inside-FOV
mask comes out wrong, the golden study's ADC read 56 % inside its field of view instead of 100 %, and a model
served on such a host read AUROC 0.84 where it reads 0.97 elsewhere (docs/preprocessing.md, "The compiled
kernels' CPU target"). The same instructions scheduled for the generic ISA level ``x86-64-v4`` are right.

So before the first kernel is compiled, :func:`configure` sets numba's target to the highest x86-64 ISA level
the host supports (``x86-64-v4``: AVX-512; ``x86-64-v3``: AVX2 and FMA; ``x86-64-v2``: SSE4.2; else
``x86-64``), with exactly that level's features. numba's cache is keyed by the target, so kernels compiled
on one machine of a level (the service image's build) also load on another. An explicit ``NUMBA_CPU_NAME``
in the environment always wins. Hosts that are not x86-64 keep numba's default.

numba fixes its target when the first function is decorated in the process, so the package's ``__init__`` calls
:func:`configure` before any kernel module of the package is imported; :mod:`preprocessing.kernel_check`
verifies the compiled kernels against their interpreted definitions whatever the target turned out to be.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: features each x86-64 ISA level adds to the one before (LLVM's definitions of the psABI levels), lowest first
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x86-64-v2", ("cx16", "popcnt", "sse4.1", "sse4.2", "ssse3", "sahf")),
    ("x86-64-v3", ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave")),
    ("x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
)
BASELINE_LEVEL = "x86-64"

_X86_64_MACHINES = ("x86_64", "amd64")


def isa_level(features: Mapping[str, bool]) -> str:
    """The highest x86-64 ISA level whose features (and those of every lower level) ``features`` all has.

    ``features`` maps LLVM feature names to whether the host has them (``llvmlite.binding.get_host_cpu_features()``).
    """
    best = BASELINE_LEVEL
    for name, added in ISA_LEVELS:
        if not all(features.get(f, False) for f in added):
            break
        best = name
    return best


def cpu_model_name() -> str:
    """The host CPU's model name (``/proc/cpuinfo``'s first ``model name``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The host CPU's model name and LLVM's name for it, e.g. ``AMD EPYC (znver5)``."""
    from llvmlite import binding as llvm

    return f"{cpu_model_name()} ({llvm.get_host_cpu_name()})"


def _codegen_started() -> bool:
    """Whether numba has already fixed its CPU target in this process (a function was decorated)."""
    from numba.core.registry import cpu_target

    return "_toplevel_target_context" in vars(cpu_target)


def compiled_target() -> str:
    """The CPU model numba's JIT compiles for in this process (starts numba's codegen if not yet started)."""
    from numba.core.registry import cpu_target

    return str(cpu_target.target_context.codegen()._get_host_cpu_name())


def configure() -> str | None:
    """Point numba at the host's x86-64 ISA level, unless the environment chose (``NUMBA_CPU_NAME``), the host
    is not x86-64, or numba's target is already fixed in this process. Returns the level set, else ``None``."""
    if os.environ.get("NUMBA_CPU_NAME"):
        return None
    if platform.machine().lower() not in _X86_64_MACHINES:
        return None
    import numba
    from llvmlite import binding as llvm

    if _codegen_started():
        return None
    level = isa_level(dict(llvm.get_host_cpu_features()))
    config: Any = numba.config  # numba's settings module (its attributes are made at import)
    config.CPU_NAME = level
    config.CPU_FEATURES = ""  # the level's own features, nothing of the host model's
    return level
