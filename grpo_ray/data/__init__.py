"""Data: JSONL loading, the prompt sampler, built-in procedural tasks."""
