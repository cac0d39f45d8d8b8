"""A hub checkpoint resolved once, by `blip2-serve run`, before anything is deployed.

Left to the replicas, a hub name that cannot be reached fails late and noisily: each replica retries its downloads on
its own, behind a readiness probe that only says "not ready". Here the driver downloads what the stages load (the
configs, the safetensors weights, the tokenizer and processor files) into the Hugging Face cache, with one progress
bar, honouring `HF_HUB_OFFLINE`, `HF_HOME` and `HF_ENDPOINT`, and the replicas load the local snapshot. A name that
does not exist, or a hub that cannot be reached with nothing cached, ends the command within seconds with a message
naming the checkpoint. (On a Ray cluster, where the replicas may run on other machines, the replicas resolve it.)
"""

from __future__ import annotations

from pathlib import Path

from blip2_serve.deployments.config import ModelConfig

# What the stages read: configs, weights, tokenizer and image processor files (not PyTorch .bin copies, not ONNX).
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


class CheckpointUnavailable(Exception):
    """The message says which checkpoint and why."""


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith("/")


def resolve(model: ModelConfig) -> ModelConfig:
    """`model` with its checkpoint as a local directory: as it is when it already is one, else the hub's snapshot
    of it (downloaded where missing). Raises CheckpointUnavailable."""
    name = model.checkpoint
    if Path(name).expanduser().is_dir():
        if not (Path(name).expanduser() / "config.json").is_file():  # else each replica fails in from_pretrained
            raise CheckpointUnavailable(f"checkpoint {name!r} is a directory without config.json: not a checkpoint")
        return model
    if _looks_like_path(name):
        raise CheckpointUnavailable(f"checkpoint {name!r}: no such directory")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = model.local_files_only or constants.HF_HUB_OFFLINE
    try:
        local = snapshot_download(name, revision=model.revision, allow_patterns=PATTERNS, local_files_only=offline)
    except GatedRepoError:
        raise CheckpointUnavailable(
            f"checkpoint {name!r} is gated on the hub: accept its terms, set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointUnavailable(
            f"checkpoint {name!r} is neither a local directory nor a model on the hub ({constants.ENDPOINT}); "
            "a private one needs HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointUnavailable(f"checkpoint {name!r} has no revision {model.revision!r}") from None
    except LocalEntryNotFoundError:
        why = (
            "offline (HF_HUB_OFFLINE or model.local_files_only)"
            if offline
            else f"{constants.ENDPOINT} cannot be reached"
        )
        raise CheckpointUnavailable(
            f"checkpoint {name!r}: {why}, and it is not in the local cache ({constants.HF_HUB_CACHE}); download it "
            "where the hub is reachable (or copy the cache), or give a local directory"
        ) from None
    except OSError as exc:  # a connection that broke mid-download, a full disk
        raise CheckpointUnavailable(f"checkpoint {name!r} could not be downloaded: {exc}") from None
    return model.model_copy(update={"checkpoint": local, "revision": None})
