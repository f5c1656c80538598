"""Client of the ``mpmri_ensemble`` Triton model (tritonclient gRPC or HTTP), optionally via shared memory.

Example::

    with EnsembleClient("localhost:8001", protocol="grpc", shared_memory="system") as client:
        outputs = client.infer(images, availability)   # images [B,S,D,H,W] or [S,D,H,W]
        outputs["cspca_probability"]                     # [B, 1] (or [1] for an unbatched request)

Tensor names, shapes and dtypes come from :mod:`contract`.

Shared memory (``shared_memory=``):

* ``"none"``: tensors travel in the request/response body.
* ``"system"``: one POSIX shared-memory region per tensor (tritonclient.utils.shared_memory), registered
  with the server; only region names go over the wire. Client and server must share a host.
* ``"cuda"``: one CUDA IPC region per tensor on ``cuda_device_id`` (tritonclient.utils.cuda_shared_memory;
  needs a GPU and cuda-python). Regions grow to the largest batch seen and are reused.
"""

from __future__ import annotations

import itertools
import os
import time
from types import TracebackType
from typing import Any

import numpy as np

from contract import ENSEMBLE_MODEL, MODEL_IO, TensorSpec, tensor_specs
from contract.errors import MpmriError

PROTOCOLS = ("grpc", "http")
SHARED_MEMORY_MODES = ("none", "system", "cuda")
_REGION_COUNTER = itertools.count()
#: how long closing a region waits for the server to release it (see :meth:`_Region.close`)
UNREGISTER_TIMEOUT_S = 5.0


class TritonClientError(MpmriError):
    """A request to Triton failed or its inputs do not match the contract."""


class _Region:
    """One registered shared-memory region holding one tensor (system or CUDA)."""

    def __init__(self, client: Any, mode: str, name: str, byte_size: int, device_id: int) -> None:
        self.client, self.mode, self.name, self.byte_size = client, mode, name, byte_size
        if mode == "system":
            import tritonclient.utils.shared_memory as shm

            self._shm: Any = shm
            self.key = f"/{name}"
            self.handle = shm.create_shared_memory_region(name, self.key, byte_size)
            client.register_system_shared_memory(name, self.key, byte_size)
        else:
            import tritonclient.utils.cuda_shared_memory as cudashm

            self._shm = cudashm
            self.handle = cudashm.create_shared_memory_region(name, byte_size, device_id)
            client.register_cuda_shared_memory(name, cudashm.get_raw_handle(self.handle), device_id, byte_size)

    def write(self, array: np.ndarray) -> None:
        self._shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(array)])

    def read(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        # copy: the region is reused by the next request
        return np.array(self._shm.get_contents_as_numpy(self.handle, np.dtype(dtype), list(shape)), copy=True)

    def close(self, timeout_s: float = UNREGISTER_TIMEOUT_S) -> None:
        """Unregister the region (retrying while the server still holds it), then destroy it.

        tritonserver 2.51 refuses to unregister a region "currently in use" and releases a request's regions
        only after its response has reached the client (server#7567; later servers defer the unregistration
        instead, server#7743), so an unregister right after an inference can lose that race.
        """
        unregister = (
            self.client.unregister_system_shared_memory
            if self.mode == "system"
            else self.client.unregister_cuda_shared_memory
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    unregister(self.name)
                    return
                except Exception as err:  # tritonclient's InferenceServerException (gRPC and HTTP alike)
                    if "currently in use" not in str(err) or time.monotonic() >= deadline:
                        raise
                time.sleep(0.01)
        finally:
            self._shm.destroy_shared_memory_region(self.handle)


class EnsembleClient:
    """Synchronous client of one Triton ensemble (default :data:`contract.ENSEMBLE_MODEL`).

    Args:
        url: ``host:port`` of the gRPC (default 8001) or HTTP (default 8000) endpoint.
        protocol: ``"grpc"`` or ``"http"``.
        shared_memory: ``"none"``, ``"system"`` or ``"cuda"`` (see module docstring).
        model_name: the ensemble (or any model with the same contract I/O).
        timeout_s: per-request timeout in seconds.
        cuda_device_id: GPU used for ``shared_memory="cuda"``.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        shared_memory: str = "none",
        model_name: str = ENSEMBLE_MODEL,
        timeout_s: float = 60.0,
        cuda_device_id: int = 0,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise TritonClientError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if shared_memory not in SHARED_MEMORY_MODES:
            raise TritonClientError(f"shared_memory must be one of {SHARED_MEMORY_MODES}, got {shared_memory!r}")
        self.url, self.protocol, self.shared_memory = url, protocol, shared_memory
        self.model_name, self.timeout_s, self.cuda_device_id = model_name, timeout_s, cuda_device_id
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module  # type: ignore[no-redef]
        self._module: Any = module
        self._client: Any = (
            module.InferenceServerClient(url=url, network_timeout=timeout_s)
            if protocol == "http"
            else module.InferenceServerClient(url=url)
        )
        specs = tensor_specs()
        self.input_specs: list[TensorSpec] = [specs[n] for n in MODEL_IO[ENSEMBLE_MODEL][0]]
        self.output_specs: list[TensorSpec] = [specs[n] for n in MODEL_IO[ENSEMBLE_MODEL][1]]
        self._regions: dict[str, _Region] = {}
        self._prefix = f"mpmri_{os.getpid()}_{next(_REGION_COUNTER)}"

    # ------------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when the server is live and the model is ready."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model_name))
        except Exception:  # noqa: BLE001 - any connection failure means "not ready"
            return False

    def _region(self, tensor: str, byte_size: int) -> _Region:
        region = self._regions.get(tensor)
        if region is not None and region.byte_size >= byte_size:
            return region
        if region is not None:
            region.close()
        region = _Region(self._client, self.shared_memory, f"{self._prefix}_{tensor}", byte_size, self.cuda_device_id)
        self._regions[tensor] = region
        return region

    def _check_inputs(self, images: np.ndarray, availability: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        images_spec, availability_spec = self.input_specs
        images = np.asarray(images, dtype=images_spec.dtype)
        availability = np.asarray(availability, dtype=availability_spec.dtype)
        unbatched = images.ndim == len(images_spec.shape)
        if unbatched:
            images, availability = images[None], availability[None]
        if images.shape[1:] != images_spec.shape:
            raise TritonClientError(
                f"images must be [B, *{images_spec.shape}] or {images_spec.shape}, got {images.shape}"
            )
        if availability.shape != (images.shape[0], *availability_spec.shape):
            raise TritonClientError(
                f"availability must be [{images.shape[0]}, *{availability_spec.shape}], got {availability.shape}"
            )
        return np.ascontiguousarray(images), np.ascontiguousarray(availability), unbatched

    def infer(self, images: np.ndarray, availability: np.ndarray) -> dict[str, np.ndarray]:
        """Run the ensemble.

        Args:
            images: ``[B, S, D, H, W]`` or ``[S, D, H, W]`` float32, normalized (preprocessing output).
            availability: ``[B, S]`` or ``[S]``; 1 = sequence present, 0 = missing.

        Returns:
            every ensemble output of ``contract.MODEL_IO`` (``fused_map``, ``cspca_map``, ``score_map``, ...) as
            numpy arrays, with the batch axis when the request had one.

        Raises:
            TritonClientError: wrong shapes, or the server rejected / failed the request.
        """
        images, availability, unbatched = self._check_inputs(images, availability)
        batch = images.shape[0]
        use_shm = self.shared_memory != "none"
        inputs = []
        for spec, array in zip(self.input_specs, (images, availability), strict=True):
            item = self._module.InferInput(spec.name, list(array.shape), spec.client_dtype)
            if use_shm:
                region = self._region(spec.name, array.nbytes)
                region.write(array)
                item.set_shared_memory(region.name, array.nbytes)
            else:
                item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = []
        for spec in self.output_specs:
            item = (
                self._module.InferRequestedOutput(spec.name, binary_data=True)
                if self.protocol == "http"
                else self._module.InferRequestedOutput(spec.name)
            )
            if use_shm:
                nbytes = batch * int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
                region = self._region(spec.name, nbytes)
                item.set_shared_memory(region.name, nbytes)
            outputs.append(item)
        from tritonclient.utils import InferenceServerException

        try:
            kwargs: dict[str, Any] = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self._client.infer(self.model_name, inputs, outputs=outputs, **kwargs)
        except InferenceServerException as err:
            raise TritonClientError(f"{self.model_name} inference failed at {self.url}: {err.message()}") from err
        arrays: dict[str, np.ndarray] = {}
        for spec in self.output_specs:
            if use_shm:
                arrays[spec.name] = self._regions[spec.name].read(spec.dtype, (batch, *spec.shape))
            else:
                arrays[spec.name] = result.as_numpy(spec.name)
        if unbatched:
            arrays = {name: array[0] for name, array in arrays.items()}
        return arrays

    def close(self) -> None:
        """Unregister and destroy the shared-memory regions, close the connection."""
        regions, self._regions = self._regions, {}
        try:
            errors = []
            for region in regions.values():  # every region is destroyed even when one fails to unregister
                try:
                    region.close()
                except Exception as err:
                    errors.append(f"{region.name}: {err}")
            if errors:
                raise TritonClientError("could not unregister shared-memory regions: " + "; ".join(errors))
        finally:
            self._client.close()

    def __enter__(self) -> EnsembleClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
