import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random tiny Qwen2 + tokenizer, built offline and saved with save_pretrained."""
    from grpo_ray.data.tasks import tokenizer_corpus
    from grpo_ray.models.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), tokenizer_corpus(49), seed=0)


sys.path.insert(0, str(REPO / "tests"))  # reward_fns, for user-verifier tests


@pytest.fixture(scope="module", autouse=True)
def no_warm_sandbox_left():
    """A module's tool calls leave this process a warm sandbox (uid 65534 processes, alive as
    long as the process); stop it, so that the next module starts with none."""
    yield
    if "grpo_ray.verifiers.warm_sandbox" in sys.modules:
        sys.modules["grpo_ray.verifiers.warm_sandbox"].shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance per test module (never joins another cluster). Module scope, not
    session: test_job_submit's `ray stop` stops every Ray on the machine, and a driver whose
    raylet dies exits at once, so no in-process Ray may be alive while it runs."""
    ray = init_local_ray()
    yield ray
    ray.shutdown()


@dataclass
class RayHead:
    env: dict  # for subprocesses: RAY_AUTH_MODE=disabled, no RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:PORT (job submission, state API)
    gcs: str  # 127.0.0.1:PORT (ray.init / RAY_ADDRESS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real `ray start --head` on free ports (token authentication off, as PLATFORM.md says for
    local debugging), stopped afterwards. `ray stop` stops every Ray on the machine: no module
    that uses this may hold the in-process ray_local at the same time."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    subprocess.run([f"{bin_dir}/ray", "start", "--head", "--num-cpus=2", f"--port={gcs}", "--include-dashboard=true",
                    f"--dashboard-port={dash}", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=180)
    try:
        yield RayHead(env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}")
    finally:
        subprocess.run([f"{bin_dir}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def init_local_ray(**resources):
    """ray.init of a private local instance. Once in a CI run its raylet did not come up ("The
    current node timed out during startup") right after another module's instance had shut
    down; a second attempt after a pause starts cleanly."""
    import time

    import ray

    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                     runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}}, **resources)
            return ray
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            time.sleep(10)
