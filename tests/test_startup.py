"""Start-up (issue 27): the phases every run records (timings.json), and a run stopped while its
actors start leaves nothing behind on the cluster it joined (slow: a real `ray start --head`).

Keep this module free of the in-process `ray_local` fixture: ray_head's `ray stop` stops every
Ray on the machine."""
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
         "eval.samples=4", "eval.ks=[1,4]", "learner.micro_batch_size=8", "run.plots=false",
         "run.tensorboard=false"]


def test_a_timeline_lays_out_phases_and_role_marks():
    from grpo_ray.roles.startup import StartupClock, Timeline

    t = Timeline(zero=100.0)
    t.add("ray start or connect", 101.0, 104.0)
    t.add_role("generator 0", created=104.0, marks={"process": 103.5, "init": 106.0, "vllm import": 110.0,
                                                     "vllm engine": 111.0})
    rows = {r["phase"]: r for r in t.rows()}
    assert rows["ray start or connect"] == {"phase": "ray start or connect", "start_s": 1.0, "seconds": 3.0}
    # marks in time order: a worker process Ray had started before the actor was created comes first
    assert rows["generator 0: worker process start"]["seconds"] == -0.5
    assert rows["generator 0: worker start, imports"] == {"phase": "generator 0: worker start, imports",
                                                          "start_s": 3.5, "seconds": 2.5}
    assert rows["generator 0: vllm engine"]["seconds"] == 1.0
    assert t.at("generator 0: vllm import") == 10.0 and t.at("nothing") is None
    clock = StartupClock()
    clock.mark("x")
    assert clock.marks["process"] <= clock.marks["init"] <= clock.marks["x"]


GC_SCRIPT = """
import gc, weakref
import cloudpickle
from grpo_ray.roles.startup import gc_paused, in_own_process

class Node:
    pass

kept, frozen = [], gc.get_freeze_count()
with gc_paused():
    assert not gc.isenabled()
    cycle = Node(); cycle.me = cycle; dead = weakref.ref(cycle); del cycle  # garbage only a collection finds
    kept.append([Node() for _ in range(1000)])
assert gc.isenabled() and dead() is None, "the start-up's garbage is collected at its end"
assert gc.get_freeze_count() >= frozen + 1000, "what the start-up built is frozen"
frozen = gc.get_freeze_count()
try:
    with gc_paused():
        more = [Node() for _ in range(1000)]
        raise KeyError("the start-up failed")
except KeyError:
    pass
assert gc.isenabled() and gc.get_freeze_count() == frozen, "after an error: the collector back on, nothing frozen"
gc.disable()
with gc_paused():
    pass
assert not gc.isenabled(), "a collector the caller had turned off stays off"
gc.enable()

class Role:
    def __init__(self, x):
        self.enabled, self.x = gc.isenabled(), x

assert Role(1).enabled, "the role class itself leaves the collector alone"
Actor = cloudpickle.loads(cloudpickle.dumps(in_own_process(Role)))  # as Ray ships an actor class
role = Actor(3)
assert (Actor.__name__, isinstance(role, Role), role.enabled, role.x, gc.isenabled()) == ("Role", True, False, 3, True)
print("ok")
"""


def test_an_actors_start_up_runs_without_the_collector_then_freezes_what_it_built():
    """gc_paused / in_own_process (the role classes as Ray actor classes) in a process of their
    own: they set process-wide collector state."""
    out = subprocess.run([sys.executable, "-c", GC_SCRIPT], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _live(dashboard: str) -> tuple[list[str], list[str]]:
    """(actor classes not dead and Serve applications, placement groups not removed) on the
    cluster. An application counts from when it is asked for: Serve's controller deploys it
    whether or not the driver that asked waits."""
    import urllib.request

    from ray.util.state import list_actors, list_placement_groups

    actors = [a.class_name for a in list_actors(address=dashboard, limit=1000) if a.state != "DEAD"]
    groups = [g.placement_group_id for g in list_placement_groups(address=dashboard, limit=1000)
              if g.state != "REMOVED"]
    try:
        with urllib.request.urlopen(f"{dashboard}/api/serve/applications/", timeout=10) as r:
            apps = list((json.load(r).get("applications") or {}))
    except OSError:  # Serve not started on this cluster yet
        apps = []
    return actors + [f"app {a}" for a in apps], groups


@pytest.mark.slow
@pytest.mark.parametrize("when", ["Generator", "app grpo-verifier-", "ServeReplica"])
def test_a_run_stopped_during_start_up_leaves_no_actors_or_placement_groups(ray_head, tiny_model_dir, tmp_path,
                                                                            when):
    """SIGTERM once the roles' actors exist (Generator: before the verifier pool; app: while the
    driver deploys the pool; ServeReplica: the pool is up and the driver waits for the engines)."""
    cmd = [sys.executable, "-m", "grpo_ray", "train", f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}",
           "run.name=stop", "train.steps=5", "reward.pool.mode=serve", *SMALL]  # default.yaml's is local
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            actors, groups = _live(ray_head.dashboard)
            if any(when in a for a in actors):
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert groups, "the roles' placement group should exist once their actors do"
        assert not (tmp_path / "stop" / "timings.json").exists()  # still starting: no step ran
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 143, out[-3000:]
    assert "joined the running Ray cluster at " in out
    deadline = time.time() + 60  # actor deaths reach the GCS asynchronously
    while time.time() < deadline:
        actors, groups = _live(ray_head.dashboard)
        left = [a for a in actors if a != "ServeController"]  # Serve's own, one per cluster, by design
        if not left and not groups:
            break
        time.sleep(1)
    assert not left and not groups, (left, groups)


@pytest.mark.slow
@pytest.mark.parametrize("eval_at_start", [True, False])
def test_a_run_writes_its_start_up_and_shut_down_phases(tiny_model_dir, tmp_path, eval_at_start, monkeypatch):
    """timings.json: every phase from the process start to the actors' stop, time to first step;
    train.eval_at_start=false: no evaluation before step 1. Without eval_at_start the run is of
    the built-in base (cached first, as a user's second run finds it). Neither driver imports
    transformers (~3 CPU-s at start-up; the generators give the pad id, the learner saves the
    tokenizer with the policy)."""
    model = [f"model.path={tiny_model_dir}"] if eval_at_start else ["model.path=builtin:tiny", "warmstart.steps=2"]
    pool = "serve" if eval_at_start else "local"  # local: configs/default.yaml's
    args = ["train", "--address", "local", *model, f"run.output_dir={tmp_path}", "run.name=t", "train.steps=2",
            f"train.eval_at_start={eval_at_start}", *([] if pool == "local" else ["reward.pool.mode=serve"]), *SMALL]
    monkeypatch.setenv("GRPO_RAY_CACHE_DIR", str(tmp_path / "cache"))
    if not eval_at_start:
        _cache_builtin_base(args)
    # the CLI as `grpo-ray` runs it, saying at exit whether its process imported transformers
    code = ("import atexit, runpy, sys; atexit.register(lambda: print('transformers imported:', "
            "'transformers' in sys.modules)); sys.argv = ['grpo-ray', *sys.argv[1:]]; "
            "runpy.run_module('grpo_ray', run_name='__main__')")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (a user's folder has its tokenizer.json checked with the tokenizers library alone)
    assert "transformers imported: False" in proc.stdout, proc.stdout[-2000:]
    saved = tmp_path / "t" / "final_model"
    assert (saved / "tokenizer.json").is_file() and (saved / "config.json").is_file()
    assert "Token authentication is enabled" not in proc.stderr  # a Ray the run owns: nothing to act on
    for noise in ("built successfully", "Loading weights", "Triton is installed", "reduce_op", "NUMA binding"):
        assert noise not in proc.stderr + proc.stdout, noise
    timings = json.loads((tmp_path / "t" / "timings.json").read_text())
    phases = {p["phase"]: p for p in timings["phases"]}
    verifiers = "verifier pool (Serve)" if pool == "serve" else "verifiers (local)"
    for name in ("interpreter, imports, config", "ray start or connect", "placement group", verifiers,
                 "generator 0: vllm import", "generator 0: vllm engine", "learner 0: deepspeed init",
                 "learner 0: reference model load", "first step", "final evaluation", "final model", "stop actors"):
        assert name in phases and phases[name]["seconds"] >= 0, name
    # its own Ray (--address local), stopped by train() while the plots are drawn, not by Ray's exit hook
    stopped = phases["stop actors"]["start_s"] + phases["stop actors"]["seconds"]
    assert phases["ray shut-down"]["start_s"] >= stopped - 0.002  # (each rounded to the ms)
    first = phases["first step"]
    assert timings["time_to_first_step_s"] == pytest.approx(first["start_s"] + first["seconds"], abs=0.01)
    assert 0 < timings["time_to_first_step_s"] < timings["until_exit_s"]
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "eval/pass@1" in r]
    assert evals == ([0, 2] if eval_at_start else [2])
    assert ("first evaluation" in phases) == eval_at_start
    if eval_at_start:
        assert phases["first evaluation"]["start_s"] >= phases["generator 0: vllm engine"]["start_s"]


RELEASE = """
import sys, ray
from grpo_ray.roles import actors
actors.init_ray(sys.argv[1] if len(sys.argv) > 1 else None)
node = ray._private.worker._global_node
monitors = [info.process for info in node.all_processes.get("monitor", [])]
seen, shutdown = [], ray.shutdown
ray.shutdown = lambda *a, **k: seen.extend(p.poll() for p in monitors) or shutdown(*a, **k)
actors.release_ray()
print("monitors", len(monitors), "dead when Ray's shut-down began", seen)
"""


@pytest.mark.slow
def test_releasing_ray_kills_its_own_monitor_first_and_leaves_a_joined_cluster_alone(ray_head):
    """Ray's autoscaler monitor hangs 1 s on SIGTERM (it reports its failure to the GCS, which
    ray.shutdown stops first) before Ray kills it: release_ray kills it first, in a Ray this
    process started; the monitor of a cluster it joined is that cluster's."""
    env = {**ray_head.env, "PYTHONPATH": str(REPO)}
    own = subprocess.run([sys.executable, "-c", RELEASE, "local"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=180)
    assert own.returncode == 0 and f"monitors 1 dead when Ray's shut-down began [{-signal.SIGKILL}]" in own.stdout, \
        own.stdout + own.stderr[-2000:]
    port = ray_head.gcs.rsplit(":", 1)[1]
    head_monitor = ["pgrep", "-f", f"autoscaler/_private/monitor.py .*--gcs-address=[^ ]*:{port}( |$)"]
    assert subprocess.run(head_monitor, capture_output=True).returncode == 0  # the head's is running
    joined = subprocess.run([sys.executable, "-c", RELEASE], cwd=REPO, env={**env, "RAY_ADDRESS": ray_head.gcs},
                            capture_output=True, text=True, timeout=180)
    assert joined.returncode == 0 and "monitors 0 dead when Ray's shut-down began []" in joined.stdout, \
        joined.stdout + joined.stderr[-2000:]
    assert subprocess.run(head_monitor, capture_output=True).returncode == 0  # and still is


def _cache_builtin_base(args: list[str]) -> None:
    """The built-in base the run of `args` asks for, built into GRPO_RAY_CACHE_DIR."""
    from grpo_ray.config import load_config
    from grpo_ray.data.datasets import load_datasets
    from grpo_ray.driver.outputs import prepare_model

    cfg = load_config(str(REPO / "configs" / "default.yaml"), [a for a in args if "=" in a])  # the CLI's default
    prepare_model(cfg, load_datasets(cfg.data, cfg.run.seed)[0], "", lambda *_: None)


def test_deepspeed_ops_are_built_per_python_environment(tmp_path, monkeypatch):
    """torch's default build folder for JIT ops is per Python version, and DeepSpeed's build.ninja
    names the environment's include paths: a checkout's venv and a fresh clone's rebuilt the
    shared-memory op in turn (~35 s at a learner's start). Each environment now has its own."""
    from grpo_ray.models.cache import torch_extensions_dir

    monkeypatch.setenv("GRPO_RAY_CACHE_DIR", str(tmp_path))
    here = torch_extensions_dir()
    assert here.startswith(str(tmp_path / "torch_extensions")) and here == torch_extensions_dir(sys.prefix)
    assert torch_extensions_dir("/opt/other-venv") != here
    assert torch_extensions_dir(torch_version="0.0.1") != here


@pytest.mark.slow
def test_a_learner_rank_loads_its_ops_from_its_environments_folder(tiny_model_dir, tmp_path):
    """A DeepSpeed learner (its own process, as under Ray) builds or finds the shared-memory op in
    torch_extensions_dir(); a folder the user set is kept."""
    from grpo_ray.models.cache import torch_extensions_dir

    code = ("import os, sys; from grpo_ray.roles.learner import Learner; "
            "Learner(sys.argv[1], lr=1e-3, loss_kwargs=dict(eps_low=0.2, eps_high=0.2, beta=0.0), "
            "micro_batch_size=2, zero_stage=0, master_port=int(sys.argv[2])); "
            "print('DIR', os.environ['TORCH_EXTENSIONS_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    mine = tmp_path / "mine"  # the user's folder: a link to the same build, so it is not built twice
    for port, user_dir in ((29861, None), (29862, str(mine))):
        if user_dir:
            mine.symlink_to(torch_extensions_dir(), target_is_directory=True)
        run_env = {**env, **({"TORCH_EXTENSIONS_DIR": user_dir} if user_dir else {})}
        out = subprocess.run([sys.executable, "-c", code, tiny_model_dir, str(port)], env=run_env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        used = out.stdout.strip().splitlines()[-1].removeprefix("DIR ")
        assert used == (user_dir or torch_extensions_dir())
    assert (Path(torch_extensions_dir()) / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
