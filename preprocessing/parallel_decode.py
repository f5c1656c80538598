"""Decoding compressed pixel data in worker processes (one persistent pool per process, created on first use).

The JPEG 2000 / HTJ2K (OpenJPEG), JPEG-LS (CharLS), JPEG Lossless (GDCM) and RLE decoders hold the GIL, so
threads do not decode frames concurrently; processes do. Each worker decodes whole objects with the same
function as the calling process (:func:`preprocessing.dicom_io.decode_instance_checked`) on a pickled copy
of the dataset, so the stored values are the same bit for bit (``tests/test_preprocess_speedups.py``).

The pool is created once and reused by every later call, from any thread (the gRPC service preprocesses in
threads). Its workers are started with ``spawn`` (never ``fork``, which is unsafe in a threaded process);
if the pool cannot start or breaks, decoding falls back to the calling process for the rest of the process's
life, with the same result.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: fewer compressed objects than this are decoded in the calling process (the round trip costs ~1 ms each)
MIN_OBJECTS = 8
#: most worker processes of the shared pool
MAX_WORKERS = 4

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_broken = False


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes used when the settings leave it open: one per available core (at most
    :data:`MAX_WORKERS`); ``0`` (decode in the calling process) on a single core."""
    cores = available_cores()
    return min(cores, MAX_WORKERS) if cores > 1 else 0


def _shared_pool(workers: int) -> ProcessPoolExecutor | None:
    global _pool
    with _lock:
        if _broken:
            return None
        if _pool is None:
            try:
                _pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            except (OSError, ValueError, RuntimeError) as err:  # pragma: no cover - no processes allowed here
                _mark_broken(err)
                return None
        return _pool


def _mark_broken(err: BaseException) -> None:
    global _broken, _pool
    _broken = True
    logger.warning("decoding in worker processes is off for this process (%s: %s)", type(err).__name__, err)
    pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def decode_objects(
    decode: Callable[[Any, str], np.ndarray], datasets: Sequence[Any], labels: Sequence[str], workers: int
) -> list[np.ndarray]:
    """``[decode(ds, label) for ds, label in zip(datasets, labels)]``, in up to ``workers`` processes.

    ``decode`` must be a module-level function (it is pickled by reference). Errors it raises (the typed
    :class:`~preprocessing.errors.PreprocessError` of a damaged or undecodable object) are raised here, the
    first in input order. Runs in the calling process when ``workers < 2``, for fewer than
    :data:`MIN_OBJECTS` objects, or when the pool is unavailable.
    """
    pool = _shared_pool(workers) if workers >= 2 and len(datasets) >= MIN_OBJECTS else None
    if pool is not None:
        try:
            futures: list[Future[np.ndarray]] = [pool.submit(decode, ds, lb) for ds, lb in zip(datasets, labels)]
            return [f.result() for f in futures]
        except BrokenProcessPool as err:  # a worker died or could not start (e.g. no __main__ guard): in process
            with _lock:
                if _pool is pool:
                    _mark_broken(err)
    return [decode(ds, lb) for ds, lb in zip(datasets, labels)]
