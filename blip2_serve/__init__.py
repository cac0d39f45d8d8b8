"""blip2-serve: a production model server for Salesforce BLIP-2, and its light client.

`from blip2_serve import Blip2Client, AsyncBlip2Client` is the SDK (no torch, no ray, no server code): this package
re-exports `blip2_serve.clients`. The rest lives in subpackages, one per folder of the repository:
`blip2_serve.serve` (the Ray Serve application, its protocols and the CLI), `blip2_serve.deployments` (the model
stages), `blip2_serve.exporters` (ONNX, the Triton repository, test checkpoints) and `blip2_serve.clients` (the SDK and
the tensor contract); pyproject.toml maps each to its folder.
"""

from blip2_serve import clients
from blip2_serve.clients import *  # noqa: F401,F403  (the SDK's names, as clients.__all__ lists them)

__all__ = list(clients.__all__)
