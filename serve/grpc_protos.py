"""tritonclient's generated KServe v2 gRPC modules, importable under the names their messages pickle as.

The generated classes say they live in `grpc_service_pb2` and `model_config_pb2`; Ray pickles requests and
responses between its gRPC proxy and the replicas, so both import this module (the proxy through
SERVICER_FUNCTION, the replicas through serve/grpc.py) and find the modules under those names.
"""

import sys

from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

sys.modules.setdefault("grpc_service_pb2", service_pb2)
sys.modules.setdefault("model_config_pb2", model_config_pb2)

add_servicer = service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server

__all__ = ["add_servicer", "model_config_pb2", "service_pb2"]
