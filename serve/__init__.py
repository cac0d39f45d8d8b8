"""blip2-serve's edge: typed config, the application builder, HTTP (KServe v2) and the CLI."""

__version__ = "0.1.0"
