"""The cascade's model stages: the screening worker (stage 1) and the Triton model (stage 2)."""
