"""The compiled preprocessing kernels, checked against their own Python definitions on this machine.

Every numba kernel of the pipeline (resampling, normalization, the DICOM element scan) is run twice on small
fixed inputs that reach its branches: compiled, and interpreted (``py_func``, with the kernels it calls
interpreted too). Both must give the same bits. A compiler that miscompiles for this host (LLVM 22.1 did for
AMD Zen 4/5 CPU models; :mod:`preprocessing.numba_target`) then fails loudly at start instead of serving
wrong tensors: the service's warm-up and the training cache build call :func:`check_kernels`, and the suite
runs it on every CI machine. It takes about 0.1 s once the kernels are compiled.
"""

from __future__ import annotations

import builtins
import types
from collections.abc import Callable
from typing import Any

import numpy as np


class KernelCheckError(RuntimeError):
    """A compiled kernel disagrees with its Python definition on this machine."""


def _numba_float(value: Any) -> Any:
    """``float()`` as numba types it: a float32 stays float32 (Python's ``float`` would widen it to float64, and
    ``float(a) - b`` of two float32 values would then round differently than the compiled kernel does)."""
    return value if isinstance(value, np.float32) else builtins.float(value)


def interpreted(kernel: Any, module: types.ModuleType) -> Callable[..., Any]:
    """The Python definition of the numba ``kernel`` of ``module``; the module's other kernels that it calls are
    interpreted too, and ``float()`` is typed as numba types it."""
    from numba.core.registry import CPUDispatcher

    namespace = dict(vars(module))
    namespace["float"] = _numba_float
    for name, value in vars(module).items():
        if isinstance(value, CPUDispatcher):
            f = value.py_func
            namespace[name] = types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__)
    f = kernel.py_func
    return types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__)


def _rotation(axis: tuple[float, float, float], angle_rad: float) -> np.ndarray:
    u = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def _resampling_cases() -> list[tuple[str, Any, np.ndarray, np.ndarray, np.ndarray]]:
    """``(name, kernel, source [K,J,I], offset [3], steps [3,3])``: oblique maps through the general kernel
    (partly outside the source), diagonal ones (fractional offsets, a flipped axis) through the separable one."""
    from preprocessing import linear_resample as lr

    rng = np.random.default_rng(20261127)
    source = rng.normal(100.0, 30.0, size=(6, 11, 29)).astype(np.float32)
    cases: list[tuple[str, Any, np.ndarray, np.ndarray, np.ndarray]] = []
    for t, (axis, angle) in enumerate((((0.2, 0.3, 1.0), 0.5), ((1.0, -0.4, 0.1), 1.1), ((0.0, 1.0, 0.3), -0.7))):
        steps = _rotation(axis, angle) * np.array([0.7, 0.9, 1.3])[:, None]
        offset = np.array([-0.8 + 0.3 * t, 0.4 - 0.2 * t, -0.6 + 0.1 * t])
        cases.append((f"general[{t}]", lr._resample_general, source, offset, steps))
    for t, (start, diagonal) in enumerate(
        (((-0.5, 0.25, -0.45), (0.5, 0.75, 0.4)), ((8.3, -0.2, 3.5), (-1.0, 1.0, -0.6)))
    ):
        cases.append((f"separable[{t}]", lr._resample_separable, source, np.array(start), np.diag(diagonal)))
    return cases


def _check_resampling() -> list[str]:
    from preprocessing import linear_resample as lr

    shape = (5, 9, 37)  # grid [D, H, W]: rows long enough for the vectorized loops
    failures = []
    for name, kernel, source, offset, steps in _resampling_cases():
        results = []
        for run in (kernel, interpreted(kernel, lr)):
            out = np.empty(shape, dtype=np.float32)
            inside = np.empty(shape, dtype=np.bool_)
            count = run(source, offset, steps, -7.0, out, inside, 0, shape[0])
            results.append((out, inside, int(count)))
        (out_c, inside_c, count_c), (out_p, inside_p, count_p) = results
        if not (np.array_equal(inside_c, inside_p) and count_c == count_p and np.array_equal(out_c, out_p)):
            failures.append(
                f"linear_resample.{name}: {int(np.sum(inside_c != inside_p))} of {inside_c.size} inside-FOV bits"
                f" and {int(np.sum(out_c.view(np.uint32) != out_p.view(np.uint32)))} values differ"
            )
    return failures


def _check_normalization() -> list[str]:
    from preprocessing import normalize as nz

    rng = np.random.default_rng(7)
    values = rng.normal(0.0, 2.0, size=300).astype(np.float32)
    values[[3, 50]] = np.nan
    values[[7, 8]] = (-0.0, 0.0)
    inside = rng.random(300) < 0.8
    failures = []
    outs = []
    for run in (nz._scale_clip, interpreted(nz._scale_clip, nz)):
        out = np.empty_like(values)
        run(values, inside, out, np.float32(0.25), np.float32(1.5), np.float32(-2.0), np.float32(2.5), np.float32(-9.0))
        outs.append(out)
    differ = int(np.sum(outs[0].view(np.uint32) != outs[1].view(np.uint32)))
    if differ:
        failures.append(f"normalize._scale_clip: {differ} values differ")
    finite = values[np.isfinite(values)]
    ranks = np.asarray([0, 5, finite.size // 2, finite.size - 1], dtype=np.int64)
    for masked in (False, True):
        mask = inside[np.isfinite(values)] if masked else np.zeros(1, dtype=np.bool_)
        n_selected = int(mask.sum()) if masked else finite.size
        wanted = np.minimum(ranks, n_selected - 1)
        compiled = nz._radix_select(finite.view(np.uint32), mask, masked, wanted)
        python = interpreted(nz._radix_select, nz)(finite.view(np.uint32), mask, masked, wanted)
        if not (np.array_equal(compiled[0], python[0]) and bool(compiled[1]) == bool(python[1])):
            failures.append(f"normalize._radix_select (masked={masked}): order statistics differ")
    return failures


def _dicom_body() -> bytes:
    """An explicit-VR little-endian data set body with short and long VRs, a sequence of undefined length and
    encapsulated pixel data."""
    import struct

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF"):
            return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    item = element(0x0008, 0x1150, b"UI", b"1.2.3\x00") + element(0x0008, 0x1155, b"UI", b"1.2.3.4\x00")
    sequence = (
        struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, len(item))
        + item
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    fragments = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"\x01\x02\x03\x04"
    delimiter = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + fragments + delimiter
    return (
        element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.4\x00")
        + element(0x0018, 0x0050, b"DS", b"3.0 ")
        + sequence
        + element(0x0028, 0x0010, b"US", struct.pack("<H", 64))
        + element(0x0029, 0x1010, b"OB", b"\x00" * 6)
        + pixels
    )


def _check_element_scan() -> list[str]:
    from preprocessing import element_scan as es

    buf = np.frombuffer(_dicom_body(), dtype=np.uint8)
    compiled = es._scan(buf, 0, es._VR_KIND, es._VR_CODE)
    python = interpreted(es._scan, es)(buf, 0, es._VR_KIND, es._VR_CODE)
    n = int(compiled[0])
    fields = zip(compiled[1:], python[1:], strict=True)
    same = n == int(python[0]) and all(np.array_equal(a[:n], b[:n]) for a, b in fields)
    if n <= 0 or not same:
        return [f"element_scan._scan: {n} elements compiled, {int(python[0])} interpreted, or their fields differ"]
    return []


def check_kernels() -> dict[str, Any]:
    """Run every preprocessing kernel compiled and interpreted on fixed inputs; raise :class:`KernelCheckError`
    naming each disagreement, the CPU target and the remedy. Returns ``{"numba_target", "cases"}`` when all agree."""
    from preprocessing import numba_target

    failures = _check_resampling() + _check_normalization() + _check_element_scan()
    target = numba_target.compiled_target()
    if failures:
        raise KernelCheckError(
            f"the compiled preprocessing kernels disagree with their Python definitions on this CPU (numba target"
            f" {target!r}): " + "; ".join(failures) + ". The tensors would be wrong; set NUMBA_CPU_NAME to an ISA"
            " level such as x86-64-v3 (or 'generic') and NUMBA_CPU_FEATURES='' in the environment, clear numba's"
            " cache, and report the CPU model"
        )
    other_cases = 4  # scale-and-clip, radix select unmasked and masked, element scan
    return {"numba_target": target, "cases": len(_resampling_cases()) + other_cases}
