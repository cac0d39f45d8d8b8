"""The optional API key: every route but health wants `Authorization: Bearer <key>` (HTTP header, gRPC metadata).

The key is read from an environment variable of the serving replicas (`server.api_key_env`), never from the config
file, and compared in constant time (digests of equal length, hmac.compare_digest).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

# KServe v2 health: server live/ready and model ready (HTTP routes, and the gRPC methods of the same meaning).
# The playground's page and its two files are public too: they hold no secret, and the page asks for the key.
_PUBLIC_PATH = re.compile(
    r"^/v2/health/(live|ready)$|^/v2/models/[^/]+(/versions/[^/]+)?/ready$|^/?$|^/playground(/app\.js|/style\.css)?$"
)
PUBLIC_GRPC_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


def is_public_path(path: str) -> bool:
    return bool(_PUBLIC_PATH.match(path))


class ApiKey:
    """One shared secret; `accepts` takes the Authorization value ("Bearer <key>") and answers in constant time."""

    def __init__(self, secret: str):
        if not secret:
            raise ValueError("the API key is empty")
        self._digest = hashlib.sha256(secret.encode("utf-8")).digest()

    @classmethod
    def from_env(cls, name: str) -> ApiKey:
        secret = os.environ.get(name, "")
        if not secret:
            raise ValueError(f"server.api_key_env names {name}, which is not set (or empty) where this replica runs")
        return cls(secret)

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            token = ""  # still compared, so that the time taken says nothing
        offered = hashlib.sha256(token.strip().encode("utf-8", "replace")).digest()
        return hmac.compare_digest(offered, self._digest) and scheme.lower() == "bearer"
