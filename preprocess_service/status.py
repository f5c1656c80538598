"""Which gRPC status a router gets for which failure (one table, documented in docs/service.md)."""

from __future__ import annotations

import grpc

from preprocess_service.triton import ServedModelError, TritonInferenceError, TritonUnavailableError
from preprocessing import errors as pe

#: exception type -> status code; the first matching entry wins (subclasses before their bases)
STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (pe.NoT2WError, grpc.StatusCode.FAILED_PRECONDITION),
    (pe.TooManyInstancesError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (pe.RulesFileError, grpc.StatusCode.INTERNAL),
    (pe.PreprocessError, grpc.StatusCode.INVALID_ARGUMENT),
    (TritonUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ServedModelError, grpc.StatusCode.UNAVAILABLE),
    (TritonInferenceError, grpc.StatusCode.INTERNAL),
)


class RequestError(Exception):
    """A request problem found by the service itself (stream layout, sizes, queue): status + message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_for(err: BaseException) -> grpc.StatusCode | None:
    """The status for an expected failure; ``None`` for an unexpected one (INTERNAL, logged with traceback)."""
    if isinstance(err, RequestError):
        return err.code
    for kind, code in STATUS_BY_ERROR:
        if isinstance(err, kind):
            return code
    return None
