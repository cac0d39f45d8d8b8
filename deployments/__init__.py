"""Ray Serve deployments of BLIP-2: the vision stage, the LLM stage and their composition."""
