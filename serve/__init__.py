"""blip2-serve's edge: the typed config, the application builder, the Ingress deployment and its FrontDoor, the
protocol adapters (KServe v2 over HTTP and gRPC, OpenAI), the CLI, and `blip2-serve batch` on Ray Data."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source: pyproject.toml's version, as installed
    __version__ = version("blip2-serve")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
