"""Models: loading and logprob passes (modeling), the built-in tiny model and its warm start."""
