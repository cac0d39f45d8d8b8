"""Triton Python-backend models of BLIP-2: each repository `model.py` imports one of these modules.

They run the project's own code (deployments/, deployments/kserve.py) inside Triton's Python backend stub:
`vision` (pixel_values -> image_embeds), `llm` (image_embeds + prompt -> text, decoupled for streaming) and
`blip2` (the public model: image bytes + prompt -> text, by BLS calls to the other two).
"""
