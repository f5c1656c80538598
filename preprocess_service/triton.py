"""The Triton ensemble seen from the service: its contract, readiness and inference (``tritonclient.grpc.aio``).

* :func:`load_served_model` reads the served contract from the ensemble's config parameter
  ``mpmri_contract`` (written by ``mpmri export``) and checks the ensemble's tensors against it, so the
  service preprocesses onto whatever grid the deployed model was trained for.
* :class:`TritonEnsemble` runs one study with binary tensors, over plain gRPC or system shared memory (a
  pool of region sets, one per concurrent study), retrying UNAVAILABLE with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from contract import ENSEMBLE_MODEL, MODEL_IO, ContractMismatchError, ServedContract, tensor_specs
from contract.errors import MpmriError
from postprocessing.lesion_scoring import LESION_SCORING_PARAMETER, LesionScorer

log = logging.getLogger(__name__)

CONTRACT_PARAMETER = "mpmri_contract"


class TritonUnavailableError(MpmriError):
    """Triton cannot be reached, or the ensemble is not ready (retryable)."""


class TritonInferenceError(MpmriError):
    """Triton answered the inference with an error that retrying will not fix."""


class ServedModelError(MpmriError):
    """The served model's recorded contract cannot be honoured by this service (names the difference)."""


@dataclass(frozen=True)
class ServedModel:
    """What the service learned from Triton about the deployed ensemble."""

    name: str
    version: str
    contract: ServedContract
    #: the second-stage lesion scorer the ensemble config carries (``mpmri_lesion_scoring``), or ``None``
    lesion_scorer: LesionScorer | None = None


def _is_unavailable(err: InferenceServerException) -> bool:
    status = (err.status() or "").upper()
    text = (err.message() or "").lower()
    return (
        "UNAVAILABLE" in status
        or "DEADLINE_EXCEEDED" in status
        or "failed to connect" in text
        or "connection refused" in text
        or "socket closed" in text
        or "not ready" in text
        or "unavailable" in text
    )


async def load_served_model(client: Any, model_name: str = ENSEMBLE_MODEL) -> ServedModel:
    """Read and check the contract of ``model_name`` from Triton.

    Raises:
        TritonUnavailableError: Triton or the model is not reachable/ready.
        ServedModelError: no recorded contract, or one this code cannot produce tensors for; or the
            ensemble's input tensors do not match the contract's grid; or a lesion scorer this code cannot apply
            (malformed, or fitted on other features: the message names the difference).
    """
    try:
        response = await client.get_model_config(model_name, as_json=True)
        metadata = await client.get_model_metadata(model_name, as_json=True)
    except InferenceServerException as err:
        raise TritonUnavailableError(f"cannot read the config of {model_name}: {err.message()}") from None
    config = response.get("config", response)
    raw = (config.get("parameters", {}).get(CONTRACT_PARAMETER) or {}).get("string_value")
    if not raw:
        raise ServedModelError(
            f"model {model_name} has no '{CONTRACT_PARAMETER}' config parameter: re-export it with `mpmri export`"
        )
    try:
        contract = ServedContract.from_json(raw)
    except ContractMismatchError as err:
        raise ServedModelError(f"model {model_name}: {err}") from None
    specs = tensor_specs(contract.grid)
    inputs = {t["name"]: [int(d) for d in t.get("dims", [])] for t in config.get("input", [])}
    for name in MODEL_IO[ENSEMBLE_MODEL][0]:
        want = list(specs[name].shape)
        if inputs.get(name) != want:
            raise ServedModelError(
                f"model {model_name}: input {name} has dims {inputs.get(name)}, its contract's grid needs {want}"
            )
    scorer = None
    raw_scorer = (config.get("parameters", {}).get(LESION_SCORING_PARAMETER) or {}).get("string_value")
    if raw_scorer:
        try:
            scorer = LesionScorer.from_json(raw_scorer)
            scorer.check_features()
        except ValueError as err:
            raise ServedModelError(f"model {model_name}: {err}") from None
    versions = metadata.get("versions") or ["1"]
    return ServedModel(name=model_name, version=str(max(versions, key=int)), contract=contract, lesion_scorer=scorer)


class _ShmSet:
    """System shared-memory regions for one study's inputs and outputs (created and registered once)."""

    def __init__(self, prefix: str, sizes: dict[str, int]) -> None:
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self.sizes = sizes
        self.names = {tensor: f"{prefix}_{tensor}" for tensor in sizes}
        self.handles = {
            tensor: shm.create_shared_memory_region(self.names[tensor], "/" + self.names[tensor], size)
            for tensor, size in sizes.items()
        }
        self.registered = False

    async def register(self, client: Any) -> None:
        for tensor, name in self.names.items():
            with contextlib.suppress(InferenceServerException):
                await client.unregister_system_shared_memory(name)
            await client.register_system_shared_memory(name, "/" + name, self.sizes[tensor])
        self.registered = True

    def close(self) -> None:
        for handle in self.handles.values():
            with contextlib.suppress(Exception):  # best effort at shutdown
                self._shm.destroy_shared_memory_region(handle)


class TritonEnsemble:
    """Async access to the ensemble. ``await start()`` once; ``infer`` from many tasks."""

    def __init__(
        self,
        url: str,
        model_name: str = ENSEMBLE_MODEL,
        shared_memory: str = "none",
        timeout_s: float = 60.0,
        retries: int = 3,
        max_concurrent: int = 4,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.shared_memory = shared_memory
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_concurrent = max_concurrent
        self.client = triton_aio.InferenceServerClient(url)
        self.model: ServedModel | None = None
        self._shm_free: asyncio.Queue[_ShmSet] | None = None
        self._shm_all: list[_ShmSet] = []

    async def is_ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready()) and bool(await self.client.is_model_ready(self.model_name))
        except Exception:  # noqa: BLE001 - any transport error means "not ready"
            return False

    async def refresh_model(self) -> ServedModel:
        """(Re)read the served contract; the first call also sizes the shared-memory pool."""
        model = await load_served_model(self.client, self.model_name)
        if self.model is not None and model.contract != self.model.contract:
            log.warning("served contract of %s changed: the new grid is used from now on", self.model_name)
            self._close_shm()
        self.model = model
        if self.shared_memory == "system" and self._shm_free is None:
            self._shm_free = asyncio.Queue()
            specs = tensor_specs(model.contract.grid)
            sizes = {name: int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize for name, spec in specs.items()}
            for i in range(self.max_concurrent):
                shm_set = _ShmSet(f"mpmri_{os.getpid()}_{id(self) & 0xFFFF:x}_{i}", sizes)
                self._shm_all.append(shm_set)
                self._shm_free.put_nowait(shm_set)
        return model

    def invalidate_registrations(self) -> None:
        """Triton restarted: regions must be registered again before their next use."""
        for shm_set in self._shm_all:
            shm_set.registered = False

    def _close_shm(self) -> None:
        for shm_set in self._shm_all:
            shm_set.close()
        self._shm_all = []
        self._shm_free = None

    async def _infer_once(self, images: np.ndarray, availability: np.ndarray) -> dict[str, np.ndarray]:
        assert self.model is not None
        specs = tensor_specs(self.model.contract.grid)
        in_names, out_names = MODEL_IO[ENSEMBLE_MODEL]
        arrays = {"images": images[None], "availability": availability[None]}
        if self._shm_free is None:
            inputs = []
            for name in in_names:
                item = triton_aio.InferInput(name, list(arrays[name].shape), specs[name].client_dtype)
                item.set_data_from_numpy(arrays[name])
                inputs.append(item)
            # every output is requested: asking for a subset deadlocks Triton 2.51 ensembles (server#7482)
            outputs = [triton_aio.InferRequestedOutput(name) for name in out_names]
            result = await self.client.infer(self.model_name, inputs, outputs=outputs, client_timeout=self.timeout_s)
            return {name: np.asarray(result.as_numpy(name))[0] for name in out_names}
        shm_set = await self._shm_free.get()
        try:
            if not shm_set.registered:
                await shm_set.register(self.client)
            import tritonclient.utils.shared_memory as shm

            inputs = []
            for name in in_names:
                shm.set_shared_memory_region(shm_set.handles[name], [np.ascontiguousarray(arrays[name])])
                item = triton_aio.InferInput(name, list(arrays[name].shape), specs[name].client_dtype)
                item.set_shared_memory(shm_set.names[name], arrays[name].nbytes)
                inputs.append(item)
            outputs = []
            for name in out_names:
                item = triton_aio.InferRequestedOutput(name)
                item.set_shared_memory(shm_set.names[name], shm_set.sizes[name])
                outputs.append(item)
            await self.client.infer(self.model_name, inputs, outputs=outputs, client_timeout=self.timeout_s)
            return {
                name: np.array(
                    shm.get_contents_as_numpy(
                        shm_set.handles[name], np.dtype(specs[name].dtype), [1, *specs[name].shape]
                    )
                )[0]
                for name in out_names
            }
        except InferenceServerException:
            shm_set.registered = False
            raise
        finally:
            self._shm_free.put_nowait(shm_set)

    async def infer(self, images: np.ndarray, availability: np.ndarray) -> dict[str, np.ndarray]:
        """Run one study (``images`` ``[S, D, H, W]``, ``availability`` ``[S]``); outputs without batch axis.

        Raises:
            TritonUnavailableError: Triton stayed unreachable through every retry.
            TritonInferenceError: Triton rejected the request.
        """
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                if self.model is None:
                    await self.refresh_model()
                return await self._infer_once(images, availability)
            except (InferenceServerException, TritonUnavailableError) as err:
                text = err.message() if isinstance(err, InferenceServerException) else str(err)
                if isinstance(err, InferenceServerException) and not _is_unavailable(err):
                    raise TritonInferenceError(f"{self.model_name} failed: {text}") from None
                if attempt == self.retries:
                    raise TritonUnavailableError(
                        f"Triton at {self.url} is unavailable ({text}); retried {self.retries} times"
                    ) from None
                log.warning("Triton unavailable (%s); retry %d in %.1f s", text, attempt + 1, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._shm_all:
            for shm_set in self._shm_all:
                if shm_set.registered:
                    for name in shm_set.names.values():
                        with contextlib.suppress(Exception):
                            await self.client.unregister_system_shared_memory(name)
            self._close_shm()
        await self.client.close()
