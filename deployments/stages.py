"""The model stages as Ray Serve deployments, declared by import path.

A deployment built from a class makes whoever builds the application import the class's module: here torch and
transformers, about 6 s of a `blip2-serve run` start on 2 cores spent in the driver before Ray even starts, and again
in Serve's build task for a config file. Declared by import path, the application builds from these light
declarations, and each replica imports its own stage's module (deployments/vision.py, llm.py, retrieval_stage.py),
where the classes are plain: they can be built in-process too (tests).
"""

from __future__ import annotations

from blip2_serve.deployments.metrics import INTERNAL_LOGGING
from ray import serve

Vision = serve.deployment(name="Vision", logging_config=INTERNAL_LOGGING)(
    "blip2_serve.deployments.vision.VisionDeployment"
)
LLM = serve.deployment(name="LLM", logging_config=INTERNAL_LOGGING)("blip2_serve.deployments.llm.LLMDeployment")
Retrieval = serve.deployment(name="Retrieval", logging_config=INTERNAL_LOGGING)(
    "blip2_serve.deployments.retrieval_stage.RetrievalDeployment"
)
