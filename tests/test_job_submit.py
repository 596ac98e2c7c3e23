"""A real `ray start --head` and `ray job submit` of the training entrypoint (slow).

Runs its own Ray head on free ports (conftest's ray_head) and stops it afterwards. Keep this
module free of the in-process `ray_local` fixture: a driver already connected to another Ray
would be confusing.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# as in docs/guide.md: offline actors, and no local runs uploaded with the code (Ray leaves out .git itself)
RUNTIME_ENV = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": ["runs/"]})


def test_ray_job_submit_runs_training_and_leaves_run_dir(ray_head, tmp_path):
    env, address = ray_head.env, ray_head.dashboard
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
    assert "joined the running Ray cluster at " in log  # and that it ran on the cluster, not a Ray of its own
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert (run_dir / "final_model" / "config.json").is_file()
