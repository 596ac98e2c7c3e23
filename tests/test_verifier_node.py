"""A real two-node Ray cluster on this machine (slow): `ray start --head` plus a worker node that
advertises the custom resource `verifier`; the verifier pool's replicas must land on that node.
Like test_job_submit, this module runs its own Ray and stops it (`ray stop`) at the end."""
import json
import os
import socket
import subprocess
import sys

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


# Runs in a fresh interpreter: Serve keeps per-process router state, and a process that used Serve
# on an earlier Ray session (the rest of the test suite) can wait on that stale state for ever.
CHECK = r"""
import json, sys, tempfile
import ray
from grpo_ray.roles.actors import actor_env
from grpo_ray.config import load_config
from grpo_ray.roles.verifier_pool import VerifierPool

ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
verifier_nodes = [n["NodeID"] for n in nodes if n["Resources"].get("verifier")]
cfg = load_config(None, [f"run.output_dir={tempfile.mkdtemp()}", "reward.pool.min_replicas=2",
                         "reward.pool.max_replicas=2", "reward.pool.request_timeout_s=60"])
pool = VerifierPool(cfg.reward, actor_env(), task=cfg.data.verifier, name=cfg.run.name)
try:
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{pool.app}#")]
    where = ray.get([ray.get_actor(a["name"], namespace=a["namespace"]).__ray_call__.remote(
        lambda self: ray.get_runtime_context().get_node_id()) for a in replicas])
    scores = pool.score([{"answer": "4"}] * 3, ["#### 4", "#### 5", "4"])
finally:
    pool.shutdown()
print(json.dumps({"nodes": len(nodes), "verifier_nodes": verifier_nodes, "replica_nodes": where,
                  "rewards": [s.reward for s in scores]}))
"""


def test_verifier_replicas_land_on_the_node_with_the_verifier_resource(two_nodes):
    address, env = two_nodes
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", CHECK, address], env={**env, "PYTHONPATH": repo},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 2 and len(out["verifier_nodes"]) == 1
    assert out["replica_nodes"] == out["verifier_nodes"] * 2  # both replicas on the verifier node
    assert out["rewards"] == [1.0, 0.0, 1.0]
