"""The light client side of blip2-serve: the SDK and the model contract. Imports no torch, no ray, no server code.

from blip2_serve import Blip2Client, AsyncBlip2Client  (the package re-exports this module's names)
"""

from blip2_serve.clients.errors import (
    Blip2Error,
    ConnectionFailedError,
    InvalidRequestError,
    ModelNotFoundError,
    ServerError,
    ServiceUnavailableError,
)
from blip2_serve.clients.sdk import AsyncBlip2Client, Blip2Client, Sample

__all__ = [
    "AsyncBlip2Client",
    "Blip2Client",
    "Blip2Error",
    "ConnectionFailedError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "Sample",
    "ServerError",
    "ServiceUnavailableError",
]
