"""The model stages of BLIP-2 and what they share: the vision, LLM and retrieval deployments, the continuous-batching
engine, model loading, image checks, the internal types and errors, the KServe v2 codec, the metrics and the drain
coordinator (drain.py). The stages are composed at the edge, by serve/frontdoor.py."""
