"""The light client side of blip2-serve: the model contract (and, later, the SDK). No torch, no ray."""
