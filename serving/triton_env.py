"""The Triton installation used on CPU machines: nvidia-pytriton's ``tritonserver`` plus our backends.

nvidia-pytriton ships a real ``tritonserver`` (2.51) with the Python backend but without the onnxruntime
or TensorRT backends. :func:`prepare_environment` assembles a backend directory under ``build/triton``:

* ``python/``: the wheel's Python backend plus the Python 3.11 ``triton_python_backend_stub``.
* ``onnxruntime/``: ``backends/onnxruntime/model.py``, a *Python-based backend*. Triton serves models with
  ``backend: "onnxruntime"`` through that ``model.py`` when no ``libtriton_onnxruntime.so`` exists, so the
  same model repository loads unchanged on an NGC Triton with the real onnxruntime backend.

The stub process runs isolated and uses the first ``python3`` on ``PATH``; the server environment puts the
virtual environment's ``bin`` first and :func:`check_stub_python` verifies it (numpy 1.x, onnxruntime).
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from contract.errors import MpmriError

#: repository root (parent of this package)
REPO_ROOT = Path(__file__).resolve().parents[1]
#: where the assembled backend directory and server logs live (git-ignored build output)
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "triton"
#: source of our Python-based onnxruntime backend
ONNXRUNTIME_BACKEND_SOURCE = REPO_ROOT / "backends" / "onnxruntime" / "model.py"


class TritonEnvironmentError(MpmriError):
    """The Triton installation or the environment the server would run with is unusable."""


@dataclasses.dataclass(frozen=True)
class TritonInstallation:
    """Paths of the ``tritonserver`` shipped by nvidia-pytriton.

    Attributes:
        server_binary: the ``tritonserver`` executable.
        python_backend_dir: the wheel's ``backends/python`` (``libtriton_python.so``).
        stub: ``triton_python_backend_stub`` for this interpreter's Python version.
        wheel_libs_dir: the wheel's bundled shared libraries (``nvidia_pytriton.libs``).
        python_libdir: directory holding ``libpython3.X.so`` (stub and backend link against it).
        python_bin_dir: ``bin`` of the virtual environment whose ``python3`` the stub must use.
    """

    server_binary: Path
    python_backend_dir: Path
    stub: Path
    wheel_libs_dir: Path
    python_libdir: Path
    python_bin_dir: Path


def find_installation() -> TritonInstallation:
    """Locate nvidia-pytriton's ``tritonserver`` for the running interpreter.

    Raises:
        TritonEnvironmentError: nvidia-pytriton is missing or incomplete.
    """
    try:
        import pytriton
    except ImportError as err:
        raise TritonEnvironmentError("nvidia-pytriton is not installed (pip install -c constraints.txt -e .)") from err
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    inst = TritonInstallation(
        server_binary=root / "bin" / "tritonserver",
        python_backend_dir=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        wheel_libs_dir=root.parent.parent / "nvidia_pytriton.libs",
        python_libdir=Path(str(sysconfig.get_config_var("LIBDIR"))),
        python_bin_dir=Path(sys.executable).parent,
    )
    for path in (inst.server_binary, inst.python_backend_dir / "libtriton_python.so", inst.stub, inst.wheel_libs_dir):
        if not path.exists():
            raise TritonEnvironmentError(f"nvidia-pytriton installation is incomplete: {path} is missing")
    return inst


def _sync_file(src: Path, dst: Path) -> None:
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def assemble_backends(inst: TritonInstallation, build_dir: Path = DEFAULT_BUILD_DIR) -> Path:
    """Create (idempotently) ``build_dir/backends`` with ``python/`` and ``onnxruntime/``; return its path."""
    backends = build_dir / "backends"
    for src in inst.python_backend_dir.iterdir():
        if src.is_file():
            _sync_file(src, backends / "python" / src.name)
    _sync_file(inst.stub, backends / "python" / "triton_python_backend_stub")
    if not ONNXRUNTIME_BACKEND_SOURCE.is_file():
        raise TritonEnvironmentError(f"onnxruntime backend source is missing: {ONNXRUNTIME_BACKEND_SOURCE}")
    _sync_file(ONNXRUNTIME_BACKEND_SOURCE, backends / "onnxruntime" / "model.py")
    return backends


def server_environment(inst: TritonInstallation, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver``: venv ``bin`` first on PATH, libpython + wheel libs on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(inst.python_bin_dir), env.get("PATH", "")]).rstrip(os.pathsep)
    libs = [str(inst.python_libdir), str(inst.wheel_libs_dir)]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env.pop("PYTHONHOME", None)
    # the stub imports our backend's model.py only; PYTHONPATH from a test runner must not leak numpy 2 in
    env.pop("PYTHONPATH", None)
    return env


_STUB_PROBE = (
    "import sys, numpy, onnxruntime; "
    "print(f'{sys.version_info.major}.{sys.version_info.minor} {numpy.__version__} {onnxruntime.__version__}')"
)


def check_stub_python(inst: TritonInstallation, env: dict[str, str]) -> str:
    """Run ``python3`` with the PATH the server gets and verify what the stub will import.

    Returns:
        one line: ``"<python> numpy <version> onnxruntime <version>"``.

    Raises:
        TritonEnvironmentError: wrong Python version, numpy 2 (the stub is built against numpy 1.x: it would
            return empty tensors), or onnxruntime missing.
    """
    python3 = shutil.which("python3", path=env["PATH"])
    if python3 is None:
        raise TritonEnvironmentError("no python3 on the PATH the Triton server gets")
    proc = subprocess.run([python3, "-c", _STUB_PROBE], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise TritonEnvironmentError(
            f"{python3} (first python3 on the server PATH) cannot import numpy/onnxruntime: {tail}"
        )
    py_version, numpy_version, ort_version = proc.stdout.split()
    expected = f"{sys.version_info.major}.{sys.version_info.minor}"
    if py_version != expected:
        raise TritonEnvironmentError(f"{python3} is Python {py_version}; the backend stub needs Python {expected}")
    if int(numpy_version.split(".")[0]) >= 2:
        raise TritonEnvironmentError(
            f"{python3} has numpy {numpy_version}; the Triton Python backend stub needs numpy<2 "
            f"(put the virtual environment's bin first on PATH)"
        )
    return f"{python3} numpy {numpy_version} onnxruntime {ort_version}"


@dataclasses.dataclass(frozen=True)
class PreparedTriton:
    """Everything needed to start ``tritonserver``: binary, backend directory and environment."""

    installation: TritonInstallation
    backend_dir: Path
    env: dict[str, str]
    stub_python: str


def prepare_environment(build_dir: Path = DEFAULT_BUILD_DIR) -> PreparedTriton:
    """Find the installation, assemble backends, build and check the server environment."""
    inst = find_installation()
    backend_dir = assemble_backends(inst, build_dir)
    env = server_environment(inst)
    stub_python = check_stub_python(inst, env)
    return PreparedTriton(installation=inst, backend_dir=backend_dir, env=env, stub_python=stub_python)
