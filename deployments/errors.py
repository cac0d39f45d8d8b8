"""The one exception hierarchy. Each class carries its HTTP status and gRPC status code name.

The HTTP exception handler and the gRPC servicer both read `status_of()`; nothing else maps errors.
Every class passes its constructor arguments to `super().__init__` so that it pickles across Ray actors.
"""

from __future__ import annotations


class Blip2ServeError(Exception):
    """Base class: an error with a message that is safe to show to the client."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(Blip2ServeError):
    """The request is malformed or names a value out of range: the client must change it."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(InvalidInput):
    """The request body (or a decompressed body) is over the configured limit."""

    http_status = 413


class NotFound(Blip2ServeError):
    """The request names something this server does not have (a model, a Batch API file or batch)."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class ModelNotFound(NotFound):
    """The request names a model (or version) this server does not serve."""


class Unauthenticated(Blip2ServeError):
    """The server wants an API key and the request has none, or another one."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class Unavailable(Blip2ServeError):
    """The server is overloaded, not ready yet, or lost the replica serving the request: the client may retry later
    (HTTP answers carry Retry-After)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class DeadlineExceeded(Blip2ServeError):
    """The request's own deadline (Triton's `timeout` parameter, or the `timeout-ms` header) passed first."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class Unimplemented(Blip2ServeError):
    """A standard KServe v2 / Triton call this server does not offer (shared memory, model loading, tracing)."""

    http_status = 400
    grpc_code = "UNIMPLEMENTED"

    @classmethod
    def of(cls, call: str) -> Unimplemented:
        """The error for `call` (a gRPC method or an HTTP route), the same words over both protocols."""
        return cls(
            f"blip2-serve does not implement {call}: models are deployed by its config, inputs travel in the request "
            "(no shared memory), and tracing and logging are set at start"
        )


def status_of(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, gRPC code name, client-facing message) for any exception raised while serving.

    Errors re-raised by Ray from another actor are subclasses of their cause, so `isinstance` sees them.
    Anything that is not a Blip2ServeError is an internal error: its text is not shown to the client.
    """
    if isinstance(exc, Blip2ServeError):
        return exc.http_status, exc.grpc_code, exc.message
    if _is_backpressure(exc):
        return Unavailable.http_status, Unavailable.grpc_code, "server overloaded: too many queued requests"
    if _is_lost_replica(exc):
        return Unavailable.http_status, Unavailable.grpc_code, "the replica serving this request was lost; retry"
    return 500, "INTERNAL", "internal server error"


def _is_backpressure(exc: BaseException) -> bool:
    try:
        from ray.serve.exceptions import BackPressureError
    except ImportError:  # pragma: no cover - ray is a dependency of the server
        return False
    return isinstance(exc, BackPressureError)


def _is_lost_replica(exc: BaseException) -> bool:
    """A replica (or its node) died or became unreachable while it held the request: retriable elsewhere."""
    try:
        from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError, WorkerCrashedError
        from ray.serve.exceptions import DeploymentUnavailableError
    except ImportError:  # pragma: no cover - ray is a dependency of the server
        return False
    lost = (RayActorError, ActorUnavailableError, WorkerCrashedError, NodeDiedError, DeploymentUnavailableError)
    return isinstance(exc, lost)
