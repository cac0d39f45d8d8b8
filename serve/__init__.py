"""blip2-serve's edge: the typed config, the application builder, the Ingress deployment and its FrontDoor, the
protocol adapters (KServe v2 over HTTP and gRPC, OpenAI), the CLI, and `blip2-serve batch` on Ray Data."""

__version__ = "0.1.0"
