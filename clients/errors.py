"""Typed errors of the SDK. Each carries the server's message and the transport's status."""

from __future__ import annotations


class Blip2Error(Exception):
    """Base class: `message` is the server's (or the connection's) reason, `status` the HTTP or gRPC status."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message, status)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(Blip2Error):
    """The server refused the request as malformed or out of range (HTTP 400/413, gRPC INVALID_ARGUMENT)."""


class ModelNotFoundError(Blip2Error):
    """The server does not serve the model (HTTP 404, gRPC NOT_FOUND)."""


class AuthenticationError(Blip2Error):
    """The server wants an API key, and this one is missing or wrong (HTTP 401, gRPC UNAUTHENTICATED)."""


class DeadlineExceededError(Blip2Error):
    """The request's deadline passed before its answer (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


class ServiceUnavailableError(Blip2Error):
    """The server is overloaded or not ready (HTTP 503, gRPC UNAVAILABLE); retrying later may work."""


class ServerError(Blip2Error):
    """The server failed (HTTP 5xx, other gRPC codes)."""


class ConnectionFailedError(Blip2Error):
    """No server answered at the address."""


_BY_STATUS = {
    "400": InvalidRequestError,
    "413": InvalidRequestError,
    "404": ModelNotFoundError,
    "503": ServiceUnavailableError,
    "429": ServiceUnavailableError,
    "401": AuthenticationError,
    "504": DeadlineExceededError,
    "StatusCode.RESOURCE_EXHAUSTED": ServiceUnavailableError,  # Ray's gRPC proxy, when the ingress queue is full
    "StatusCode.UNAUTHENTICATED": AuthenticationError,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceededError,
    "StatusCode.INVALID_ARGUMENT": InvalidRequestError,
    "StatusCode.NOT_FOUND": ModelNotFoundError,
    "StatusCode.UNAVAILABLE": ServiceUnavailableError,
}


def error_for(status: str | int | None, message: str) -> Blip2Error:
    """The typed error for a transport status ("400", 404, "StatusCode.NOT_FOUND", ...)."""
    status = "" if status is None else str(status)
    return _BY_STATUS.get(status, ServerError)(message, status)
