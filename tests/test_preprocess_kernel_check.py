"""The compiled preprocessing kernels are checked against their Python definitions, on an x86-64 ISA level target.

LLVM 22.1 miscompiled the resampling kernels for AMD Zen 4/5 CPU models (the golden study's ADC read 56 % inside
its field of view); :mod:`preprocessing.numba_target` compiles for the host's ISA level instead, and
:mod:`preprocessing.kernel_check` catches any target that still disagrees.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from preprocessing import linear_resample
from preprocessing.kernel_check import KernelCheckError, check_kernels
from preprocessing.numba_target import isa_level

X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def test_compiled_kernels_agree_with_their_python_definitions_on_this_machine() -> None:
    checked = check_kernels()
    assert checked["cases"] >= 9
    if X86_64 and not os.environ.get("NUMBA_CPU_NAME"):
        assert checked["numba_target"].startswith("x86-64"), checked


def test_isa_level_is_the_highest_level_whose_features_and_those_below_are_all_present() -> None:
    v2 = {f: True for f in ("cx16", "popcnt", "sse4.1", "sse4.2", "ssse3", "sahf")}
    v3 = {**v2, **{f: True for f in ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave")}}
    v4 = {**v3, **{f: True for f in ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")}}
    assert isa_level({}) == "x86-64"
    assert isa_level(v2) == "x86-64-v2"
    assert isa_level(v3) == "x86-64-v3"
    assert isa_level(v4) == "x86-64-v4"
    assert isa_level({**v4, "fma": False}) == "x86-64-v2"  # AVX-512 without a complete v3 is not v4
    assert isa_level({**v3, "avx512f": True}) == "x86-64-v3"


class _FlipsOneInsideBit:
    """A compiled kernel that gets one inside-FOV bit wrong (as the Zen 4/5 build did), with the true definition."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.py_func = kernel.py_func

    def __call__(self, *args: Any) -> int:
        count: int = self.kernel(*args)
        inside: np.ndarray = args[5]
        inside.flat[inside.size // 2] = not inside.flat[inside.size // 2]
        return count


def test_a_kernel_that_disagrees_is_named_with_the_target_and_the_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_resample, "_resample_separable", _FlipsOneInsideBit(linear_resample._resample_separable))
    with pytest.raises(KernelCheckError, match=r"linear_resample\.separable\[0\]: 1 of \d+ inside-FOV bits") as err:
        check_kernels()
    assert "numba target" in str(err.value) and "NUMBA_CPU_NAME" in str(err.value)
    assert "general" not in str(err.value)


#: imports a kernel module (which fixes numba's target), then prints the target numba compiles for
_PRINT_TARGET = (
    "import preprocessing.linear_resample; from preprocessing import numba_target;"
    " print(numba_target.compiled_target())"
)


def _target_in_subprocess(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    done = subprocess.run(
        [sys.executable, "-c", _PRINT_TARGET], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not X86_64, reason="the ISA levels are x86-64's")
def test_the_target_is_the_hosts_isa_level_unless_the_environment_names_one() -> None:
    from llvmlite import binding as llvm

    assert _target_in_subprocess({}) == isa_level(dict(llvm.get_host_cpu_features()))
    assert _target_in_subprocess({"NUMBA_CPU_NAME": "generic"}) == "generic"


def test_the_service_warm_up_refuses_kernels_that_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    from preprocess_service.analysis import warm_up_dicom_outputs

    monkeypatch.setattr(linear_resample, "_resample_separable", _FlipsOneInsideBit(linear_resample._resample_separable))
    with pytest.raises(KernelCheckError, match="would be wrong"):
        warm_up_dicom_outputs()
