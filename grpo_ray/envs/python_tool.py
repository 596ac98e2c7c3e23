"""The `python` environment: a Python tool, in the format of tool-integrated reasoning (ToRA,
Gou et al. 2023, arXiv:2309.17452; Qwen2.5-Math's TIR): the model writes a fenced block and
opens an output block,

    ```python
    print(347*86)
    ```
    ```output

generation stops at "```output", the sandbox runs the code, and its stdout (or the error's
last line) comes back as the observation, closing the block; the model continues. A turn with
no code block ending in "```output" is the final answer: done, and the row's verifier scores the
trajectory (reward.math.extraction: marked, so that only the model's `#### n` counts, never a
number the tool printed).
"""
from __future__ import annotations

import re

from . import EnvStep
from .tools import run_python

_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
OUTPUT_FENCE = "```output"


def observation(text: str, max_chars: int) -> str:
    """The tool's output as the context shows it: truncated, then the block closed."""
    text = text.rstrip("\n")
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n... ({len(text) - max_chars} more characters)"
    return f"\n{text}\n```\n"


class PythonTool:
    stop = (OUTPUT_FENCE,)

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 256,
                 allow_unsandboxed: bool = False, warm: bool = True):
        """timeout_s, memory_mb: a call's limits (the sandbox's wall clock and address space);
        max_output_chars: what of its output the model sees; allow_unsandboxed: run without
        bubblewrap (NOT isolated) where it is missing; warm: run each call in a fork of a warm
        sandbox (verifiers/warm_sandbox.py: the same isolation per call, a fraction of the
        cost), false: in a fresh sandbox per call."""
        self.limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max(4 * max_output_chars, 4096),
                           allow_unsandboxed=allow_unsandboxed, warm=warm)
        self.max_output_chars = max_output_chars

    def reset(self, record: dict) -> str:
        return ""

    def step(self, completion: str) -> EnvStep:
        blocks = _BLOCK.findall(completion)
        if not blocks or not completion.rstrip().endswith(OUTPUT_FENCE):
            return EnvStep(done=True)  # the final answer
        result = run_python(blocks[-1], **self.limits)
        return EnvStep(observation(result.output if result.ok else result.error, self.max_output_chars),
                       tool_calls=1, tool_errors=int(not result.ok))
