"""A real two-node Ray cluster on this machine (slow): `ray start --head` plus a worker node that
advertises the custom resource `verifier`; the verifier pool's replicas must land on that node.
Like test_job_submit, this module runs its own Ray and stops it (`ray stop`) at the end."""
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes():
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    run = lambda *args: subprocess.run([f"{bin_dir}/ray", *args], env=env, check=True,  # noqa: E731
                                       capture_output=True, timeout=180)
    run("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats")
    try:
        run("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--resources", json.dumps({"verifier": 2}))
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([f"{bin_dir}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_verifier_replicas_land_on_the_node_with_the_verifier_resource(two_nodes, monkeypatch):
    import ray

    from grpo_ray.actors import actor_env
    from grpo_ray.config import load_config
    from grpo_ray.verifier_pool import VerifierPool

    address, env = two_nodes
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, logging_level="ERROR")
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2
        (verifier_node,) = [n["NodeID"] for n in nodes if n["Resources"].get("verifier")]
        cfg = load_config(None, [f"run.output_dir={tempfile.mkdtemp()}", "reward.pool.min_replicas=2",
                                 "reward.pool.max_replicas=2"])
        pool = VerifierPool(cfg, actor_env())
        try:
            replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["name"].startswith(f"SERVE_REPLICA::{pool.app}#")]
            assert len(replicas) == 2
            where = ray.get([ray.get_actor(a["name"], namespace=a["namespace"]).__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_node_id()) for a in replicas])
            assert where == [verifier_node, verifier_node]
            scores = pool.score([{"answer": "4"}] * 3, ["#### 4", "#### 5", "4"])
            assert [s.reward for s in scores] == [1.0, 0.0, 1.0]
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()
