"""A real `ray start --head` and `ray job submit` of the training entrypoint (slow).

Runs its own Ray head on free ports and stops it afterwards. Keep this module free of the
in-process `ray_local` fixture: a driver already connected to another Ray would be confusing.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# as in docs/guide.md: offline actors, and no git history or local runs uploaded with the code
RUNTIME_ENV = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": [".git", "runs/"]})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    subprocess.run([f"{bin_dir}/ray", "start", "--head", "--num-cpus=2", f"--port={gcs}", "--include-dashboard=true",
                    f"--dashboard-port={dash}", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=180)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([f"{bin_dir}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_training_and_leaves_run_dir(ray_head, tmp_path):
    env, address = ray_head
    out_dir = tmp_path / "runs"
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address,
           "--working-dir", str(REPO), "--runtime-env-json", RUNTIME_ENV, "--", "grpo-ray", "train", "configs/default.yaml", "warmstart.steps=30",
           "rollout.prompts_per_step=4", "train.steps=2", "train.eval_every=0", "eval.num_prompts=4", "eval.samples=10",
           f"run.output_dir={out_dir}", "run.name=job"]
    for _ in range(30):  # `ray start` returns before the dashboard agent takes jobs
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        log = proc.stdout + proc.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(2)
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log
    run_dir = out_dir / "job"
    assert f"run directory: {run_dir}" in log  # the job's log says where the results are
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert (run_dir / "final_model" / "config.json").is_file()
