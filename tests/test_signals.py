"""SIGTERM (what `ray job stop`, Kubernetes and Slurm send) and SIGINT stop a run cleanly: the
actors are released, the exit code is 128 + the signal, and one line says where to resume
(issue 28 #10). The slow test runs the real CLI in a subprocess with its own local Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["rollout.prompts_per_step=4", "algo.group_size=4", "train.eval_every=0", "eval.num_prompts=4",
         "eval.samples=4", "eval.ks=[1,4]", "learner.micro_batch_size=8"]


def _train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "time/step" in r]


def _title(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def test_stop_message_names_the_last_checkpoint(tmp_path):
    from grpo_ray.driver.outputs import stopped_where

    run = tmp_path / "r"
    assert "no checkpoint yet" in stopped_where(str(run), 10)
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval/pass@1": 0.1}, {"step": 1, "time/step": 1.0}, {"step": 2, "time/step": 1.0},
        {"step": 3, "time/step": 1.0}, {"step": 2, "event": "checkpoint"}]))
    msg = stopped_where(str(run), 10)
    assert msg.startswith("after step 3 of 10; the last checkpoint is step 2 (")
    assert msg.endswith("step_000002): run the same command with --resume")


def test_the_signal_handler_raises_stopped_and_is_restored():
    from grpo_ray.driver.signals import Stopped, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as e:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert e.value.signum == signal.SIGTERM and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_cli_exits_143_with_one_line(capsys):
    from grpo_ray import cli
    from grpo_ray.driver.signals import Stopped

    def fn(args):
        err = Stopped(signal.SIGTERM)
        err.where = "after step 3 of 10; no checkpoint yet"
        raise err

    class Args:
        pass

    args = Args()
    args.fn = fn
    with pytest.raises(SystemExit) as e:
        cli.run_command(args, ["train"])
    assert e.value.code == 143
    assert capsys.readouterr().err == "grpo-ray: stopped by SIGTERM after step 3 of 10; no checkpoint yet\n"
    args.fn = lambda a: (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(SystemExit) as e:
        cli.run_command(args, ["train"])
    assert e.value.code == 130 and "grpo-ray: stopped by SIGINT" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_the_run_releases_its_ray_processes_and_exits_143(tiny_model_dir, tmp_path):
    import psutil

    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    run_dir = tmp_path / "sig"
    cmd = [sys.executable, "-m", "grpo_ray", "train", "--address", "local", f"model.path={tiny_model_dir}",
           f"run.output_dir={tmp_path}", "run.name=sig", "train.steps=200", "train.checkpoint_every=1",
           "run.plots=false", "run.tensorboard=false", *SMALL]
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            start_new_session=True)

    def said() -> str:  # what the run wrote, without the actors' log lines
        log.flush()
        return "\n".join(line for line in (tmp_path / "stderr.txt").read_text().splitlines()
                         if not line.startswith("\x1b[36m(") and "(pid=" not in line[:40])
    tree: dict[int, psutil.Process] = {}
    try:
        deadline = time.time() + 420
        while time.time() < deadline and proc.poll() is None and not _train_steps(run_dir):
            time.sleep(1)
        assert proc.poll() is None, said()[-5000:]
        assert _train_steps(run_dir), "no training step within 7 minutes"
        # the child's own Ray (it started it: --address local): its raylet, GCS and workers
        for p in psutil.Process(proc.pid).children(recursive=True):
            tree[p.pid] = p
        assert any(_title(p).startswith("ray::") for p in tree.values()), [_title(p) for p in tree.values()]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = said()
    assert proc.returncode == 143, err[-5000:]
    assert "core dumped" not in err and "Aborted" not in err and "Traceback" not in err, err[-3000:]
    last = [line for line in err.splitlines() if line.startswith("grpo-ray: stopped by SIGTERM")]
    assert last and "the last checkpoint is step" in last[-1] and last[-1].endswith("run the same command with "
                                                                                 "--resume"), err[-3000:]
    gone_by = time.time() + 30
    alive = list(tree.values())
    while time.time() < gone_by:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(1)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
