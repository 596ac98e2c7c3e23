"""The maths: advantages, losses, metrics, packing and the records passed between phases.
Imports torch (and numpy) only: no Ray, vLLM, DeepSpeed or config."""
