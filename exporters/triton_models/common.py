"""What the three Triton models share: request parameters and errors (settings: exporters/triton_settings.py).

Imported only inside Triton's Python backend stub (it needs `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils
from blip2_serve.clients.contract import TRANSPORT_PARAMETERS
from blip2_serve.deployments.errors import status_of
from blip2_serve.exporters.triton_settings import TritonSettings  # noqa: F401  (the models import it from here)


def request_parameters(request) -> dict[str, Any]:
    """A request's parameters without the ones Triton's clients and server add for themselves."""
    parameters = json.loads(request.parameters() or "{}")
    return {k: v for k, v in parameters.items() if k not in TRANSPORT_PARAMETERS and not k.startswith("triton_")}


_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "NOT_FOUND": "NOT_FOUND", "UNAVAILABLE": "UNAVAILABLE"}


def triton_error(exc: BaseException) -> pb_utils.TritonError:
    """The TritonError of any exception, with the code of deployments/errors.status_of (so HTTP 400, gRPC
    INVALID_ARGUMENT for bad input)."""
    _, code, message = status_of(exc)
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, _CODES.get(code, "INTERNAL")))


def error_response(exc: BaseException) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(exc))
