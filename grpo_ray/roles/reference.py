"""Reference role: the frozen reference policy (the initial one unless algo.ref_reset_every resets
it), giving per-token logprobs for the KL term."""
from __future__ import annotations

import torch

from ..models.modeling import batched_logprobs, device, load_causal_lm
from ..core.records import Rollout, TrainBatch, padded_batch, row_share
from .startup import StartupClock


class Reference:
    def __init__(self, model_path: str, *, dtype: str = "float32", threads: int = 2, micro_batch_size: int = 64,
                 share_prompts: bool = True, temperature: float = 1.0):
        """threads: torch's intra-op threads for this process; 0 leaves them as they are (hosted in
        a learner rank's process: resources.reference_host=learner)."""
        self.clock = StartupClock()
        if threads:
            torch.set_num_threads(threads)
        self.model = load_causal_lm(model_path, dtype).to(device()).eval().requires_grad_(False)
        self.clock.mark("model load")
        self.micro_batch_size, self.share_prompts = micro_batch_size, share_prompts
        self.temperature = temperature  # the KL is between the tempered policies, as the ratio

    def startup(self) -> dict[str, float]:
        """This actor's start-up marks (roles/startup.py)."""
        return self.clock.marks

    def logprobs(self, batch: TrainBatch, share: tuple[int, int, int] | None = None) -> torch.Tensor:
        """ref_logprobs [B, T] for the batch's responses (0 on padding); with share (index, count,
        group), only that share of the rows (records.row_share), [rows of the share, T]."""
        full = batch.response_mask.shape[1]
        if share is not None:
            batch = batch.select(row_share(batch.size, *share))
        out = batched_logprobs(self.model, batch, self.micro_batch_size, self.share_prompts, self.temperature)
        # a share's select() trimmed the padding columns: back to the batch's width
        return out if out.shape[1] == full else torch.nn.functional.pad(out, (0, full - out.shape[1]))

    def rollout_logprobs(self, pad_id: int, *parts: Rollout, share: tuple[int, int, int] | None = None) -> torch.Tensor:
        """ref_logprobs [B, T] of a rollout given as its generators' parts, laid out as the
        learner's batch (records.padded_batch). The driver calls it with the
        parts' ObjectRefs while they are still sampling (Ray runs it once they are done): in sync
        mode the pass runs while the driver scores the rollout, in async mode the frozen
        reference pass of step n+1 runs beside the learner of step n."""
        return self.logprobs(padded_batch(list(parts), pad_id), share)
