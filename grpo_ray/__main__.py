"""`python -m grpo_ray ...`: the same as the `grpo-ray` command."""
from .cli import main

main()
