"""KServe v2 / Triton gRPC (`inference.GRPCInferenceService`) on Ray Serve's gRPC proxy.

Mixed into serve/ingress.Ingress: Ray routes each RPC to the method of the same name, which parses, calls the
replica's FrontDoor (`self.door`, serve/frontdoor.py) and renders. Messages are
tritonclient's own generated classes (serve/grpc_protos.py). Requests become the same InferRequest as over
HTTP (deployments/kserve.py), errors get their gRPC code from deployments/errors.status_of.
ModelStreamInfer streams the text of one image per request as it is generated, Triton-decoupled style: each
response carries the new text, the last one `triton_final_response: true`. A failed request in a stream is
answered in-band with `error_message` "<gRPC code name>: <reason>", and the stream goes on.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import grpc
import numpy as np
from blip2_serve.clients.contract import BYTES, IMAGE, INPUTS, MODEL_VERSION, OUTPUTS, RETRIEVAL_OUTPUTS, TEXT
from blip2_serve.deployments import kserve
from blip2_serve.deployments.errors import InvalidInput, Unauthenticated, Unavailable, Unimplemented, status_of
from blip2_serve.deployments.types import GenerateResult
from blip2_serve.serve import metadata, retrieval
from blip2_serve.serve.asgi import primed
from blip2_serve.serve.auth import PUBLIC_GRPC_METHODS
from blip2_serve.serve.deadline import Deadline, deadline_s, within
from blip2_serve.serve.deploy_config import SERVICER_FUNCTION  # noqa: F401 - Ray's gRPC proxy registers it
from blip2_serve.serve.frontdoor import FrontDoor
from blip2_serve.serve.grpc_protos import model_config_pb2
from blip2_serve.serve.grpc_protos import service_pb2 as pb
from google.protobuf import json_format

logger = logging.getLogger(__name__)


def _parameter(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def infer_request_from_grpc(
    request: pb.ModelInferRequest, input_names: frozenset[str] | None = None, output_names: frozenset[str] | None = None
) -> kserve.InferRequest:
    """The transport-neutral InferRequest of a ModelInferRequest (raw or typed BYTES contents), for the model
    whose tensors are `input_names` / `output_names` (blip2's by default)."""
    input_names = input_names or frozenset(spec.name for spec in INPUTS)
    output_names = output_names or frozenset(spec.name for spec in OUTPUTS)
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput("raw_input_contents must have one entry per input")
    inputs: dict[str, kserve.InputTensor] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in input_names:
            raise InvalidInput(f"unknown input {tensor.name!r}; this model takes {sorted(input_names)}")
        if request.raw_input_contents:
            elements = kserve.split_bytes_tensor(request.raw_input_contents[index], tensor.name)
        else:
            elements = list(tensor.contents.bytes_contents)
        if tensor.datatype != BYTES:
            elements = []  # the datatype check names the problem
        inputs[tensor.name] = kserve.InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), tuple(elements))
    for output in request.outputs:
        if output.name not in output_names:
            raise InvalidInput(f"unknown output {output.name!r}; this model gives {sorted(output_names)}")
    parameters = {name: _parameter(value) for name, value in request.parameters.items()}
    return kserve.InferRequest(id=request.id, parameters=parameters, inputs=inputs)


def infer_response(
    model_name: str, infer: kserve.InferRequest, texts: list[str], final: bool | None = None
) -> pb.ModelInferResponse:
    """TEXT as raw BYTES contents, the form tritonclient reads."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=infer.id)
    response.outputs.add(name=TEXT.name, datatype=TEXT.datatype, shape=kserve.output_shape(infer, len(texts)))
    response.raw_output_contents.append(kserve.serialize_bytes([t.encode("utf-8") for t in texts]))
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response


def _with_status(empty_response):
    """Turn an error raised by an RPC method into its gRPC status code and message."""

    def decorate(method):
        # Not functools.wraps: Ray reads the signature for a `grpc_context` parameter, and would follow __wrapped__.
        async def wrapper(self, request, grpc_context=None):
            try:
                if method.__name__ in PUBLIC_GRPC_METHODS:
                    return await method(self, request)
                self.authenticate(grpc_context)
                with self.door.admitted():
                    return await method(self, request)
            except Exception as exc:
                _, code, message = status_of(exc)
                if code == "INTERNAL":
                    logger.error("gRPC %s failed", method.__name__, exc_info=exc)
                if grpc_context is not None:
                    grpc_context.set_code(getattr(grpc.StatusCode, code))
                    grpc_context.set_details(message)
                return empty_response()

        wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = method.__name__, method.__qualname__, method.__doc__
        return wrapper

    return decorate


class TritonGrpcMethods:
    """GRPCInferenceService methods, mixed into serve/ingress.Ingress (which holds `door`)."""

    door: FrontDoor

    def authenticate(self, grpc_context) -> None:
        """Raise Unauthenticated unless the call's `authorization` metadata carries the API key (when one is set)."""
        if self.door.api_key is None:
            return
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        if not self.door.api_key.accepts(metadata.get("authorization")):
            raise Unauthenticated("missing or wrong API key: send metadata authorization: Bearer <key>")

    @_with_status(pb.ServerLiveResponse)
    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_with_status(pb.ServerReadyResponse)
    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not await self.door.not_ready())

    @_with_status(pb.ModelReadyResponse)
    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        served = request.name == self.door.server.model_name or self.door.serves_retrieval(request.name)
        if not served or request.version not in ("", MODEL_VERSION):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not await self.door.not_ready(request.name))

    @_with_status(pb.ServerMetadataResponse)
    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(metadata.server_metadata(), pb.ServerMetadataResponse())

    @_with_status(pb.ModelMetadataResponse)
    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        described = self.door.model_metadata(request.name, request.version)
        return json_format.ParseDict(described, pb.ModelMetadataResponse())

    @_with_status(pb.RepositoryIndexResponse)
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        """The models served here and their state (READY, or UNAVAILABLE with the pending stages)."""
        return json_format.ParseDict({"models": await self.door.repository_index()}, pb.RepositoryIndexResponse())

    @_with_status(pb.ModelStatisticsResponse)
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        """Triton's statistics: every model (and stage) served here, or the one named."""
        statistics = await self.door.statistics(request.name, request.version)
        return json_format.ParseDict(statistics, pb.ModelStatisticsResponse())

    @_with_status(pb.ModelConfigResponse)
    async def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        described = self.door.model_config(request.name, request.version)
        config = json_format.ParseDict(described, model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def _retrieval_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        door, server = self.door, self.door.server
        infer = infer_request_from_grpc(request, *retrieval.names(request.model_name))
        with door.counted(request.model_name) as counted:
            retrieve = retrieval.to_retrieval_request(
                request.model_name, infer, server.image_limits(), server.max_images_per_request
            )
            counted["rows"] = retrieve.rows
            outputs = await within(deadline_s(infer.parameters), door.retrieve(retrieve))
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=MODEL_VERSION, id=infer.id)
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=RETRIEVAL_OUTPUTS[name].datatype, shape=list(array.shape))
            response.raw_output_contents.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
        return response

    def _generate_requests(self, request: pb.ModelInferRequest):
        self.door.check_model(request.model_name, request.model_version)
        infer = infer_request_from_grpc(request)
        server = self.door.server
        generate = kserve.to_generate_requests(
            infer, server.image_limits(), server.max_images_per_request, server.default_params()
        )
        return infer, generate

    @_with_status(pb.ModelInferResponse)
    async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        if request.model_name != self.door.server.model_name:
            self.door.check_model(request.model_name, request.model_version)  # unknown models: not counted as ours
            return await self._retrieval_infer(request)
        with self.door.counted() as counted:
            infer, generate = self._generate_requests(request)
            counted["rows"] = len(generate)
            deadline = deadline_s(infer.parameters)
            results: list[GenerateResult] = await within(deadline, self.door.generate_many(generate))
        return infer_response(self.door.server.model_name, infer, [r.text for r in results])

    async def ModelStreamInfer(self, request_stream, grpc_context=None) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request in the stream (one IMAGE row) is answered by responses carrying its text as it grows."""
        try:
            self.authenticate(grpc_context)
            admitted = self.door.admitted()
            admitted.__enter__()
        except (Unauthenticated, Unavailable) as exc:  # the stream is refused: Ray keeps a code set before a raise
            grpc_context.set_code(getattr(grpc.StatusCode, exc.grpc_code))
            grpc_context.set_details(exc.message)
            raise
        try:
            async for response in self._stream_responses(request_stream):
                yield response
        finally:
            admitted.__exit__(None, None, None)

    async def _stream_responses(self, request_stream) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_stream:
            try:
                with self.door.counted():
                    infer, generate = self._generate_requests(request)
                    if len(generate) != 1:
                        raise InvalidInput(f"streaming takes one {IMAGE.name} row per request, not {len(generate)}")
                    deadline = Deadline(deadline_s(infer.parameters))
                    stream = deadline.stream(await deadline.run(primed(self.door.stream(generate[0]))))
                async for chunk in stream:
                    final = chunk.finish_reason is not None
                    if chunk.text or final:
                        response = infer_response(self.door.server.model_name, infer, [chunk.text], final=final)
                        yield pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                # In-band, as Triton reports stream errors; the code leads the message since there is no field for it.
                _, code, message = status_of(exc)
                yield pb.ModelStreamInferResponse(error_message=f"{code}: {message}")


def _unimplemented(call: str, empty_response):
    async def method(self, request):
        raise Unimplemented.of(call)

    method.__name__ = method.__qualname__ = call
    return _with_status(empty_response)(method)


# The rest of GRPCInferenceService: answered UNIMPLEMENTED with a message, not by Ray with a stack trace.
for _call in (
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
):
    setattr(TritonGrpcMethods, _call, _unimplemented(_call, getattr(pb, f"{_call}Response")))
