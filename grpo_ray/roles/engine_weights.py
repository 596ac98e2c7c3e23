"""Loading the learner's weights into a running vLLM engine, inside each of its workers
(`collective_rpc`; one per tensor-parallel shard). On vLLM's CPU backend by the model's own
loaders plus a repack of each matmul handle (`_reload_cpu_gemms`), elsewhere by the worker's
generic `reload_weights`, which streams broadcast buckets one at a time.
"""
from __future__ import annotations

import re

from .collective import receive_buckets
from .weight_sync import BucketLayout, unpack_bucket


def load_in_worker(worker, buckets) -> int:
    """Runs inside each vLLM worker (collective_rpc; one per tensor-parallel shard): load named
    tensors into the live model. Buckets given as layouts (sync.method=collective) arrive by
    broadcast from the learner (roles/collective.py). Every shard is sent the whole weights, and
    the model's own loaders cut each one's part (as at start-up)."""
    model = worker.model_runner.model
    plan = getattr(model, "_grpo_cpu_gemms", None)
    if plan is None:
        plan = model._grpo_cpu_gemms = _cpu_gemm_layers(model)
    if plan:  # loads whole blocks at a time, so it takes every bucket first (host memory)
        if buckets and isinstance(buckets[0], BucketLayout):
            buckets = receive_buckets(worker, buckets)
        weights = [item for bucket in buckets for item in unpack_bucket(bucket)]
        _reload_cpu_gemms(model, plan, weights)
        return len(weights)
    # vLLM's generic reload consumes an iterator: a broadcast bucket is received as the loader
    # reaches it and dropped after, so a GPU worker holds one bucket beside its shard, not the
    # whole model (a 70B model in bf16 is 141 GB; its TP-8 shard is 18 GB)
    weights = _Counted(item for bucket in _arriving(worker, buckets) for item in unpack_bucket(bucket))
    worker.reload_weights(weights_iterator=weights)
    return weights.count


def _arriving(worker, buckets):
    """The buckets, one at a time: as given, or received by broadcast one layout at a time."""
    for bucket in buckets:
        yield receive_buckets(worker, [bucket])[0] if isinstance(bucket, BucketLayout) else bucket


class _Counted:
    """An iterator that counts what it yields (the tensors a generic reload consumed)."""

    def __init__(self, items):
        self.items, self.count = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.count += 1
        return item


_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def _block(name: str) -> int:
    """The transformer block a weight or module belongs to (-1: embeddings, final norm, head)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else -1


def _cpu_gemm_layers(model) -> list:
    """The fast reload's plan on vLLM's CPU backend, or [] for vLLM's generic path: (module name,
    layer, meta) for every layer with a matmul handle; meta is the checkpoint-format shape of a
    weight vLLM dropped after packing it (None: the weight is still there, as in embeddings and
    the LM head).

    Why: vLLM's generic `reload_weights` restores every module to meta tensors and wraps every
    loader (~9 ms a sync for a 0.5M model here, 8-9% of the tiny step) and, on a tied LM head
    given only the embedding, keeps its handle packed from the old weights (vLLM's reload
    docstring, limitation 2). The handle is a packed copy (checked in the tests), so loading
    in place and packing each handle again is all a CPU reload needs."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    try:  # the start-up load recorded each layer's checkpoint-format tensors as meta tensors
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    except ImportError:
        return []
    plan = []
    for name, layer in model.named_modules():
        method = getattr(layer, "quant_method", None)
        if method is None:
            continue
        if not isinstance(method, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
            return []  # quantized, fused-MoE or other packed layers: only the generic path knows them
        if getattr(layer, "_cpu_skip_gemm_dispatch", False) or not hasattr(layer, "weight"):
            return []
        if layer.weight.numel() > 0:  # vLLM kept this weight: it loads in place
            plan.append((name, layer, None))
            continue
        meta = get_layerwise_info(layer).restore_metadata[0].get("weight")
        if meta is None:
            return []
        plan.append((name, layer, meta))
    return plan


def _loadable(weight):
    """A weight made from vLLM's recorded meta tensor, with its own loader: once vLLM's generic
    reload has run, the recorded tensor still carries the generic path's deferring wrapper
    (which would buffer the load and copy nothing here)."""
    loader = getattr(weight, "weight_loader", None)
    while getattr(loader, "__name__", "") == "online_process_loader":
        loader = loader.__wrapped__
    if loader is not None:
        weight.weight_loader = loader
    return weight


def _reload_cpu_gemms(model, plan: list, weights: list, group_bytes: int = 256 << 20) -> None:
    """Load in groups of whole transformer blocks, so that at most ~group_bytes of dropped
    weights exist at a time (the generic path holds one layer's): give each packed layer of the
    group a full-size weight, load through the model's own loaders (they put q/k/v and gate/up
    in place), check that every weight of the group came, then let each layer's quant method
    pack its handle again (which drops the full weight). One group for a small model: each
    `load_weights` call walks the whole module tree (~1.5 ms at the tiny size). An error leaves
    the engine half-loaded: the Generator then refuses to sample (see update_weights)."""
    import torch
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    sent: dict[int, list] = {}
    for item in weights:
        sent.setdefault(_block(item[0]), []).append(item)
    expected: dict[int, set] = {}
    for name, _ in model.named_parameters():
        expected.setdefault(_block(name), set()).add(name)
    groups, size = [[]], 0
    for block in sorted(set(sent) | set(expected)):
        if size >= group_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(block)
        size += sum(meta.numel() * meta.element_size() for name, _, meta in plan
                    if meta is not None and _block(name) == block)
    with torch.no_grad():
        for blocks in groups:
            layers = [(layer, meta) for name, layer, meta in plan if _block(name) in blocks]
            for layer, meta in layers:
                if meta is not None:
                    layer.weight = _loadable(restore_layer_refs(materialize_meta_tensor(meta), layer))
            loaded = model.load_weights([item for block in blocks for item in sent.get(block, [])])
            missing = sorted(set().union(*(expected.get(block, set()) for block in blocks)) - set(loaded))
            if missing:
                raise ValueError(f"weight sync: {len(missing)} of the engine's weights were not sent "
                                 f"(e.g. {missing[:3]}); send the learner's whole state_dict")
            for layer, _ in layers:
                layer.quant_method.process_weights_after_loading(layer)
