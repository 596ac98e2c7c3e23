"""Generator role: a vLLM engine that samples group_size completions per prompt and returns the
token ids with the sampler's own per-token logprobs (the `old_logprobs` of GRPO's ratio).

A plain class: Ray wraps it with `ray.remote` where actors are created (`actors.start_generators`).
The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): no extra process per actor (with
rollout.tensor_parallel > 1, vLLM's multiprocess executor adds one per shard), and weights are
swapped in place inside the running engine (engine_weights.py). On the CPU backend the sampler
also draws each seeded completion's step seed with one vectorised hash per step
(`_install_seeded_cpu_sampler`).
"""
from __future__ import annotations

import functools
import gc
import logging
import math
import os
import shutil
import tempfile
import time
import warnings

from ..config import ConfigError, shard_cpus
from ..core.records import Rollout
from ..models.lora import write_adapter
from .collective import GroupAddress, join_worker
from .engine_weights import load_in_worker
from .multiturn import EnvRollout, TurnLoop
from .startup import StartupClock
from .weight_sync import AdapterWeights, BucketLayout, WeightBucket


def _vllm_env(threads: str | None) -> None:
    """Before vLLM is imported: its settings, and two notices a user cannot act on (the vLLM CPU
    build finds a Triton without a CPU backend and uses its own kernels; torch's deprecated
    `reduce_op`, touched by vLLM's kernel dispatcher)."""
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if threads:  # set, not defaulted: a value inherited from the process that started Ray (an
        # in-process engine there) would bind a tensor-parallel engine's workers to one list
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads


def _s64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch holds."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GAMMA, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def splitmix64(x):
    """SplitMix64's output function (Steele, Lea & Flood 2014) on an int64 tensor, elementwise:
    int64 arithmetic wraps as uint64 does, and `>>` is made logical by masking the sign fill."""
    def lsr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)

    x = x + _GAMMA
    x = (x ^ lsr(x, 30)) * _MIX1
    x = (x ^ lsr(x, 27)) * _MIX2
    return x ^ lsr(x, 31)


def _install_eager_token_ranks() -> None:
    """vLLM's sampler ranks each sampled token with a torch.compile'd `(x >= value).sum(-1)`, which
    dynamo traces at a process's first sampling call, even with enforce_eager: ~2.5 s of CPU per
    generator, paid by the first evaluation of every run (bench_startup.py). On the CPU backend
    the eager expression does the same (its [rows, vocab] bool copy, which the compiled kernel
    avoids on GPUs, is small next to the logprobs vLLM holds anyway), so it is used there."""
    from vllm.v1.sample import sampler

    def batched_count_greater_than(x, values):
        return (x >= values).sum(-1)

    sampler.batched_count_greater_than = batched_count_greater_than


def _install_seeded_cpu_sampler() -> None:
    """Seeded sampling on vLLM's CPU backend, one vectorised hash per decoding step.

    Why: every completion samples with its own seed (reproducible, and the same whatever else is
    in the batch or however the step is split over generators). vLLM's CPU sampler then draws
    each row's step seed from the request's own torch.Generator: a randint and an .item() per
    completion per token, ~5 us each: 0.69 of the sampler's 1.02 ms a step for 128 completions.
    Here a row's step seed is SplitMix64(SplitMix64(request seed) + tokens it sampled so far):
    the same contract (one stream per completion, independent of the batch), other draws. The
    Gumbel-max kernel is vLLM's own. Rows without a seed, and fp64 Gumbel noise, stay stock."""
    import weakref

    import torch
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    stock = getattr(ops.TopKTopPSampler, "forward_cpu", None)
    if stock is None or getattr(stock, "_grpo_seeded", False):
        return  # a vLLM without this CPU path samples as it does; or installed already
    sampled = weakref.WeakKeyDictionary()  # a request's generator -> tokens it has sampled

    def forward_cpu(self, logits, generators, k, p):
        if not generators or self.use_fp64_gumbel:
            return stock(self, logits, generators, k, p)
        logits = ops.apply_top_k_top_p(logits, k, p)
        to_return = None  # as stock: the logits or logprobs vLLM reports, if processed ones
        if self.logprobs_mode == "processed_logits":
            to_return = logits
        elif self.logprobs_mode == "processed_logprobs":
            to_return = logits.log_softmax(dim=-1, dtype=torch.float32)
        seeds = torch.randint(0, 2**31, (logits.shape[0],), dtype=torch.long)  # unseeded rows
        gens = list(generators.values())
        count = [sampled.get(g, 0) for g in gens]
        sampled.update(zip(gens, [n + 1 for n in count]))
        base = [g.initial_seed() & ((1 << 63) - 1) for g in gens]
        mixed = splitmix64(splitmix64(torch.tensor(base)) + torch.tensor(count))
        seeds[list(generators)] = mixed & (2**31 - 1)
        return torch.ops._C.fused_gumbel_argmax(logits.to(dtype=torch.float32), seeds), to_return

    forward_cpu._grpo_seeded = True
    ops.TopKTopPSampler.forward_cpu = forward_cpu


def _install_worker_samplers(worker) -> None:
    """Runs in each vLLM worker (collective_rpc). With tensor_parallel > 1 vLLM spawns its
    workers (it must, in a Ray actor), so the patches the actor installed before building the
    engine are not in them; the sampler bound its forward at init, so it is bound again."""
    _install_seeded_cpu_sampler()
    _install_eager_token_ranks()
    sampler = getattr(getattr(worker.model_runner, "sampler", None), "topk_topp_sampler", None)
    if sampler is not None and getattr(sampler.forward, "__name__", "") == "forward_cpu":
        sampler.forward = sampler.forward_cpu


def _exit_when_a_worker_dies(llm):
    """tensor_parallel > 1: vLLM's executor notices a worker process that died and shuts the
    engine down, which leaves this actor alive with a dead engine. Exiting instead lets Ray
    restart the generator (resources.actor_restarts) and retry its call, as for a crash of the
    actor itself; the fleet then pushes it the current weights. Returns the executor (its
    is_failed tells a call that failed on the dead engine to exit too: see _dies_with_workers)."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    executor = getattr(core, "model_executor", None)
    if hasattr(executor, "register_failure_callback"):
        executor.register_failure_callback(_worker_died)
    return executor


def _dies_with_workers(method):
    """A call that fails because a worker died ("cancelled" from the executor's queue, often
    before the failure callback has run) exits the actor rather than return that error."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            if getattr(self._executor, "is_failed", False):
                _worker_died()
            raise
    return call


def _worker_died() -> None:
    import sys

    print("generator: a tensor-parallel worker of its vLLM engine died; exiting so that Ray restarts the "
          "generator (resources.actor_restarts)", file=sys.stderr, flush=True)
    os._exit(1)


def _device_options(cpu: bool, max_model_len: int, gpu_share: float, tensor_parallel: int) -> dict:
    """vLLM's engine options for where it runs."""
    options = {
        # vLLM checks at start that this fraction of the GPU is free: a generator sharing its
        # GPU (resources.colocate) may only claim its share
        "gpu_memory_utilization": 0.9 * min(1.0, gpu_share or 1.0)}
    if cpu:
        # no chunked prefill. A prompt split across steps makes vLLM rewind that row's
        # torch.Generator (set_offset), which a CPU generator refuses, so every seeded request
        # crashed once a step's prompts passed the 4096-token budget (8 prompts x 16 samples x 40
        # tokens); and the split would shift that row's seeds. Each step then takes whole
        # prompts, up to the budget.
        options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
    if tensor_parallel > 1:  # a worker process per shard (the in-process executor runs one)
        options.update(tensor_parallel_size=tensor_parallel, distributed_executor_backend="mp")
    return options


# the LoRA ranks vLLM accepts as max_lora_rank (vllm/config/lora.py MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _lora_options(rank: int) -> dict:
    """vLLM's engine options to serve one adapter of `rank` (none for rank 0)."""
    if not rank:
        return {}
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ConfigError(f"model.lora.rank={rank}: vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]}; "
                          "use model.lora.sync=merged")
    return {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": 1}


class Generator:
    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 512,
                 kv_cache_mb: int = 256, seed: int = 0, cpu_threads: str | None = None,
                 max_num_seqs: int = 256, enforce_eager: bool = True, gpu_share: float = 1.0, lora_rank: int = 0,
                 tensor_parallel: int = 1):
        """lora_rank > 0: the engine serves a LoRA adapter of that rank, loaded at each sync
        (model.lora.sync=adapter); before the first one it samples the base (a fresh adapter is
        zero). tensor_parallel > 1: vLLM shards the model over that many worker processes (its
        multiprocess executor), each on its own GPU, or on CPUs on its own slice of cpu_threads."""
        self.clock = StartupClock()
        self.tensor_parallel = tensor_parallel
        _vllm_env(shard_cpus(cpu_threads, tensor_parallel) if cpu_threads and tensor_parallel > 1 else cpu_threads)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.clock.mark("vllm import")
        # vLLM collects garbage fully a few times while it builds the engine (~0.3 s each over
        # the heap of its imports; it freezes the heap itself only once the engine is built).
        # What is imported by now lives as long as the process: frozen, those collections scan
        # only what the build makes.
        gc.freeze()

        cpu = current_platform.is_cpu()
        if cpu:
            _install_seeded_cpu_sampler()  # before the engine builds its sampler
            _install_eager_token_ranks()

        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                       kv_cache_memory_bytes=kv_cache_mb << 20, seed=seed, max_num_seqs=max_num_seqs,
                       enable_prefix_caching=False, use_tqdm_on_load=False,
                       # the sampled token's logprob after temperature (and top-p): the policy
                       # that sampled, which the learner computes as log_softmax(logits / T).
                       # vLLM's default (raw_logprobs) is the T = 1 softmax whatever the temperature
                       logprobs_mode="processed_logprobs",
                       **_device_options(cpu, max_model_len, gpu_share, tensor_parallel), **_lora_options(lora_rank))
        self._executor = None  # tensor_parallel > 1: vLLM's multiprocess executor
        if tensor_parallel > 1:
            if cpu:
                self.llm.collective_rpc(_install_worker_samplers)
            self._executor = _exit_when_a_worker_dies(self.llm)
        self.tokenizer = self.llm.get_tokenizer()
        self.weight_version, self.load_error = 0, None
        self.sync_group = None  # the weight-sync group joined (sync.method=collective)
        self.lora_request = None  # the adapter loaded at the last sync (model.lora.sync=adapter)
        self.adapter_root = tempfile.mkdtemp(prefix="grpo-adapter-") if lora_rank else None
        cache = self.llm.llm_engine.vllm_config.cache_config
        # tokens of KV cache (0 = unknown); checked on CPU only, see _check_kv_cache
        self.kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size if cpu else 0
        self.kv_block, self.kv_cache_mb, self.max_num_seqs = cache.block_size, kv_cache_mb, max_num_seqs
        self.kv_tokens = max(0, self.kv_tokens - cache.block_size)  # vLLM keeps one block back
        self.clock.mark("vllm engine")

    def _check_kv_cache(self, prompts: list[str], n: int, max_new_tokens: int) -> None:
        """vLLM preempts sequences when the KV cache runs out, and on the CPU a preempted seeded
        request then fails deep in the sampler ("CPU Generator does not use offset"). Say so up
        front, with the size that fits the step."""
        if not self.kv_tokens:
            return
        lens = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        # vLLM runs at most max_num_seqs sequences at once: the largest of them must fit together
        per_seq = sorted((-(-(p + max_new_tokens) // self.kv_block) for p in lens for _ in range(n)), reverse=True)
        blocks = sum(per_seq[:self.max_num_seqs])
        if blocks * self.kv_block > self.kv_tokens:
            need = math.ceil(self.kv_cache_mb * (blocks + 1) * self.kv_block / self.kv_tokens)
            raise ConfigError(f"rollout.kv_cache_mb={self.kv_cache_mb} holds {self.kv_tokens} tokens for this model; "
                             f"{len(prompts)} prompts x {n} samples up to {max_new_tokens} new tokens need "
                             f"{blocks * self.kv_block}: set rollout.kv_cache_mb to at least {need}, or give the "
                             "step more generators (rollout.num_generators)")

    @_dies_with_workers
    def generate(self, prompts: list[str], *, n: int, temperature: float, max_new_tokens: int,
                 top_p: float = 1.0, seed: int | None = None, sent: float | None = None,
                 records: list[dict] | None = None, env: EnvRollout | None = None) -> Rollout:
        """n completions per prompt, grouped contiguously: completion i answers prompt i // n.
        With a seed, prompt j's completions use seeds seed + j*n ... seed + j*n + n-1 (vLLM gives
        child k of a request seed + k), so no two completions share a random stream. sent: the
        caller's time.time() when it made the call; the wait since goes in Rollout.queued_s
        (wall clocks: exact on one node, as good as the clocks' agreement across nodes), and the
        time spent here in Rollout.sample_s. env: sample multi-turn trajectories with those env
        hosts (records: the prompts' rows, which the environments are reset with)."""
        queued, start = max(0.0, time.time() - sent) if sent else 0.0, time.perf_counter()
        if self.load_error:
            raise RuntimeError(f"the generator's last weight load failed ({self.load_error}), so its engine holds "
                               "part old, part new weights; load a whole set (update_weights) before sampling")
        from vllm import SamplingParams

        self._check_kv_cache(prompts, n, max_new_tokens)
        if env is not None:
            return self._generate_turns(prompts, records or [{} for _ in prompts], env, n=n, temperature=temperature,
                                        max_new_tokens=max_new_tokens, top_p=top_p, seed=seed, queued=queued,
                                        start=start)
        # detokenize=False: vLLM's incremental detokenizer runs per token per step (~10% of a
        # tiny model's generate here); one batched decode of the finished responses is cheaper.
        # flat_logprobs: a few flat lists per completion instead of a dict and a Logprob object
        # per token (~2.5% of a tiny model's generate call here)
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 logprobs=0, flat_logprobs=True, detokenize=False,
                                 seed=None if seed is None else seed + j * n)
                  for j in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        prompt_ids, response_ids, logprobs, truncated = [], [], [], []
        for out in outputs:
            for c in out.outputs:
                ids = list(c.token_ids)
                prompt_ids.append(list(out.prompt_token_ids))
                response_ids.append(ids)
                # logprobs=0: one entry per position, the sampled token's
                if c.logprobs.token_ids != ids:
                    raise RuntimeError("vLLM returned logprobs for other tokens than the sampled ones")
                logprobs.append(list(c.logprobs.logprobs))
                truncated.append(c.finish_reason == "length")
        # the text vLLM would have returned: special tokens (EOS) skipped
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        return Rollout(prompt_ids, response_ids, logprobs, texts, truncated, self.weight_version, queued,
                       time.perf_counter() - start)

    def _generate_turns(self, prompts: list[str], records: list[dict], env: EnvRollout, *, n: int,
                        temperature: float, max_new_tokens: int, top_p: float, seed: int | None, queued: float,
                        start: float) -> Rollout:
        """Multi-turn trajectories (roles/multiturn.py); texts are the whole responses, observations
        included, as the verifier scores them."""
        loop = TurnLoop(self.llm, self.tokenizer, env, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, lora_request=self.lora_request)
        got = loop.run(prompts, records, n, seed)
        texts = self.tokenizer.batch_decode(got.response_ids, skip_special_tokens=True)
        return Rollout(got.prompt_ids, got.response_ids, got.logprobs, texts, got.truncated, self.weight_version,
                       queued, time.perf_counter() - start, trajectories=got.trajectories, env_s=got.env_s)

    @_dies_with_workers
    def update_weights(self, buckets: list[WeightBucket], version: int) -> int:
        """Load the learner's weights into the running engine; returns tensors loaded. A load
        that fails part way leaves some layers new and some old: sampling is refused until a
        load succeeds, rather than sampling from that mix."""
        if buckets and isinstance(buckets[0], BucketLayout) and self.sync_group is None:
            # restarted since the weight-sync group formed (Ray runs the interrupted load again):
            # nothing can arrive, and the engine holds whole weights of its old version, which
            # the fleet's version check replaces (GeneratorFleet.stream)
            return 0
        self.load_error = "a weight load is in progress"
        try:
            if buckets and isinstance(buckets[0], AdapterWeights):
                loaded = self._load_adapter(buckets[0], version)
            else:
                loaded = self._load_buckets(buckets)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            raise
        self.load_error = None
        # Cached KV blocks were computed with the old weights (stale blocks gave logprob errors
        # up to 2.3 here). Prefix caching is off (the reset then walks every free block: 0.7 ms).
        if self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
            self.llm.reset_prefix_cache()
        self.weight_version = version
        return loaded

    def _load_buckets(self, buckets: list) -> int:
        """Every worker (tensor-parallel shard) loads the whole set: each must report every
        tensor loaded, or the engine would sample from a mix of shards."""
        counts = self.llm.collective_rpc(load_in_worker, args=(buckets,))
        if len(counts) != self.tensor_parallel or len(set(counts)) != 1:
            raise RuntimeError(f"weight sync: the engine's {self.tensor_parallel} workers loaded {counts} tensors; "
                               "each must load the whole set")
        return counts[0]

    def join_sync_group(self, address: GroupAddress, first_rank: int) -> list[int]:
        """sync.method=collective: every worker joins the weight-sync group (roles/collective.py)
        as first_rank + its tensor-parallel rank; returns the ranks taken."""
        ranks = self.llm.collective_rpc(join_worker, args=(address, first_rank))
        self.sync_group = address
        return ranks

    def _load_adapter(self, adapter: AdapterWeights, version: int) -> int:
        """model.lora.sync=adapter: vLLM loads an adapter from a folder (PEFT's files), by an int
        id it caches; each sync writes a new folder, drops the old adapter and adds the new one
        under a new id (the version's), so no request can run on a stale cached copy."""
        from safetensors.torch import load
        from vllm.lora.request import LoRARequest

        if self.adapter_root is None:
            raise RuntimeError("this generator was started without LoRA (lora_rank=0): it takes merged weights")
        path = os.path.join(self.adapter_root, f"v{version}")
        write_adapter(adapter.files, path)
        engine, old = self.llm.llm_engine, self.lora_request
        request = LoRARequest(f"policy-v{version}", version + 1, path)  # vLLM's ids start at 1
        if old is not None:
            engine.remove_lora(old.lora_int_id)
        if not engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter of version {version} from {path}")
        self.lora_request = request
        if old is not None and old.lora_path != path:
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return len(load(adapter.files["adapter_model.safetensors"]))

    def close(self) -> None:
        """Remove the adapter folders this engine loaded from (ray.kill runs no exit handlers)."""
        if self.adapter_root is not None:
            shutil.rmtree(self.adapter_root, ignore_errors=True)

    def ready(self) -> bool:
        return True

    def pad_token_id(self) -> int:
        """The id padded batches fill with: the tokenizer's pad token, else its end of sequence
        (what models.modeling.load_tokenizer sets). Asked of a generator, whose tokenizer is
        loaded anyway: the driver then never imports transformers (~3 CPU-s at start-up)."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def startup(self) -> dict[str, float]:
        """This actor's start-up marks (roles/startup.py)."""
        return self.clock.marks
