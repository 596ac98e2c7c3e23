"""The driver: the run loop (train), one step and its phases (step), evaluation, checkpoints
and what a run writes (outputs, tracking, plots)."""
