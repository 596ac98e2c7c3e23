"""grpo-ray: distributed GRPO (RL with verifiable rewards) for LLMs on Ray.

Layout (docs/architecture.md): core/ the maths, roles/ one module per actor role and the
driver's handles to them, driver/ the training loop and what a run writes, data/ and models/
what runs on, verifiers/ the reward functions, config/ the config tree (pydantic).
"""
__version__ = "0.1.0"
