"""The whole driver loop under real Ray with real vLLM/DeepSpeed/reference/verifier actors."""
import json
import math
import os

import pytest
import ray

from grpo_ray.config import load_config

TRAIN_FIELDS = ["step", "reward/mean", "reward/std", "reward/frac_zero_std", "advantage/variance", "kl", "clip/low",
                "clip/high", "entropy", "response_length/mean", "truncated/frac", "time/generate", "time/verify",
                "time/reference", "time/learner", "time/sync", "time/step", "time/generate_queued"]

SMALL = ["rollout.prompts_per_step=4", "algo.group_size=4", "train.steps=3",
         "train.eval_every=2", "eval.num_prompts=6", "eval.samples=10", "learner.lr=1e-3", "learner.micro_batch_size=8",
         "rollout.num_generators=2"]  # two vLLM engines share each step's prompts and both receive every sync


def _dataset(path, n=12):
    """Prompts scored by a dense user verifier, so an untrained model's groups still vary."""
    path.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                        "task": "reward_fns:digit_fraction"}) + "\n" for i in range(n)))
    return str(path)


@pytest.mark.slow
def test_few_steps_move_weights_and_log_every_field(ray_local, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo_ray.driver.train import train

    cfg = load_config("configs/default.yaml", SMALL + [
        f"run.output_dir={tmp_path}", "run.name=loop", f"model.path={tiny_model_dir}", "data.task=jsonl",
        f"data.train_path={_dataset(tmp_path / 'train.jsonl')}", "data.eval_fraction=0.5",
        "reward.components.format=0.5"])
    run_dir = train(cfg)
    assert run_dir == str(tmp_path / "loop")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "reward/mean" in r]
    eval_rows = [r for r in rows if "eval/pass@1" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        missing = [f for f in TRAIN_FIELDS if f not in r]
        assert not missing, missing
        assert r["time/step"] >= r["time/generate"] > 0
        assert r["time/generate"] >= r["time/generate_queued"] >= 0
    assert [r["weight_version"] for r in train_rows] == [0, 1, 2]  # each rollout used the latest weights
    assert [r["step"] for r in eval_rows] == [0, 2, 3]
    assert all(0 <= r["eval/pass@1"] <= r["eval/pass@10"] <= 1 for r in eval_rows)
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    # the saved policy is a Hugging Face folder whose weights differ from the base model's
    assert all(r["reward/std"] > 0 for r in train_rows)
    for r in train_rows:  # multi-faceted reward: each component logged, the total is their weighted sum
        assert r["reward/mean"] == pytest.approx(r["reward/correct/mean"] + 0.5 * r["reward/format/mean"], abs=1e-5)  # the dense reward gives every step a signal
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final_model")).state_dict()
    moved = max(float((final[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-4


@pytest.mark.slow
def test_local_verifiers_train_without_a_serve_deployment(ray_local, tiny_model_dir, tmp_path):
    """reward.pool.mode=local: a run scores in the driver's process (a user function, in its own
    worker process as on a replica) and starts no Serve replica or application."""
    from ray._private import state

    from grpo_ray.driver.train import train

    def serve_replicas():
        return sum(a["ActorClassName"].startswith("ServeReplica") for a in state.actors().values())

    before = serve_replicas()
    cfg = load_config("configs/default.yaml", SMALL + [
        f"run.output_dir={tmp_path}", "run.name=local", f"model.path={tiny_model_dir}", "data.task=jsonl",
        f"data.train_path={_dataset(tmp_path / 'train.jsonl')}", "data.eval_fraction=0.5", "reward.pool.mode=local"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"reward/mean"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3] and any(r["reward/mean"] > 0 for r in rows)
    assert serve_replicas() == before
    phases = [p["phase"] for p in json.load(open(os.path.join(run_dir, "timings.json")))["phases"]]
    assert "verifiers (local)" in phases and "verifier pool (Serve)" not in phases
    # the caller's Ray (here the tests'): left running; train() stops only a Ray it started itself
    assert ray.is_initialized() and "ray shut-down" not in phases


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True])
def test_without_kl_term_or_guard_no_reference_actor_runs(ray_local, tiny_model_dir, tmp_path, asynchronous):
    """algo.beta=0, algo.kl_stop=null (DAPO's and Dr. GRPO's recipe): no reference actor is
    started and no reference pass runs, in either mode; the loss has no KL term, and no kl is
    logged (a 0 would read as "no drift")."""
    from ray._private import state

    from grpo_ray.driver.train import train

    def references():
        return sum(a["ActorClassName"] == "Reference" for a in state.actors().values())

    before = references()
    cfg = load_config("configs/default.yaml", SMALL + [
        f"run.output_dir={tmp_path}", "run.name=noref", f"model.path={tiny_model_dir}", "data.task=jsonl",
        f"data.train_path={_dataset(tmp_path / 'train.jsonl')}", "data.eval_fraction=0.5", "train.eval_every=0",
        "algo.beta=0", "algo.kl_stop=null", f"rollout.asynchronous={str(asynchronous).lower()}"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("kl" not in r and r["time/reference"] < 0.01 and math.isfinite(r["loss"]) for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    assert references() == before  # none was ever created: no actor,
    assert not _hosted_reference(run_dir)  # and no copy in the learner ranks (resources.reference_host)
    assert not os.path.exists(os.path.join(run_dir, "plots", "kl.png"))


def _hosted_reference(run_dir: str) -> bool:
    """Whether a learner rank loaded a copy of the reference (its start-up marks, timings.json)."""
    phases = json.load(open(os.path.join(run_dir, "timings.json")))["phases"]
    return any(p["phase"].startswith("learner") and "reference" in p["phase"] for p in phases)


@pytest.mark.slow
def test_loop_with_dapo_and_off_policy_options(ray_local, tiny_model_dir, tmp_path):
    """Dynamic sampling, the soft overlong penalty, 2 epochs x 2 mini-batches, recomputed old
    logprobs with token TIS, and the entropy bonus, all at once through the real loop."""
    from grpo_ray.driver.train import train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i),
                                        "task": "reward_fns:uniform_for_even"}) + "\n" for i in range(16)))
    cfg = load_config("configs/default.yaml", SMALL + [
        f"run.output_dir={tmp_path}", "run.name=dapo", f"model.path={tiny_model_dir}", "data.task=jsonl",
        f"data.train_path={data}", "data.eval_fraction=0.25", "train.eval_every=0", "algo.dynamic_sampling=true",
        "algo.overlong=penalty", "algo.overlong_buffer=8", "algo.overlong_penalty_factor=0.5",
        "algo.ppo_epochs=2", "algo.mini_batches=2",
        "algo.recompute_old_logprobs=true", "algo.tis=token", "algo.entropy_coef=0.001", "algo.epsilon=0.2",
        "train.spot_check_every=2", "train.spot_check_samples=6"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0.2 <= r["dynamic/frac_dropped"] <= 0.8  # about half the prompts give equal rewards
        assert r["dynamic/rounds"] >= 2 and r["dynamic/groups"] == 4
        # every group kept is informative (a factor of 1 could cancel: 1 - 1 for a 16-token answer
        # equals 0 for an empty one in the same group)
        assert r["reward/frac_zero_std"] == 0.0
        assert r["optimizer_steps"] == 4.0
        assert r["reward/overlong/mean"] <= 0.0
        assert 0 < r["tis/weight_mean"] <= 2.0 and abs(r["sampler_kl"]) < 1e-3  # fp32 vLLM ~ learner
        assert r["time/generate"] > 0 and r["time/verify"] > 0
        # the rounds' sampling and queueing are part of the generate phase; each is a round's
        # largest over the generators, which may be two different ones, so their sum is not bounded
        assert 0 < r["time/generate_sampling"] <= r["time/generate"] + 0.01
        assert 0 <= r["time/generate_queued"] <= r["time/generate"] + 0.01
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["step_000002.jsonl", "step_000002.md"]
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples", "step_000002.jsonl"))]
    assert len(samples) == 6 and all(s["reason"] for s in samples)
    assert samples[0]["prompt"] == samples[1]["prompt"] != samples[2]["prompt"]  # two per group


def test_spot_check_files_escape_markdown(tmp_path):
    from grpo_ray.driver.outputs import write_samples

    row = {"prompt": "a|b\nc", "response": "x", "reward": 1.0, "advantage": 0.5, "reason": "correct",
           "truncated": False}
    write_samples(str(tmp_path), 10, [row])
    assert [json.loads(line) for line in open(tmp_path / "samples" / "step_000010.jsonl")] == [row]
    md = (tmp_path / "samples" / "step_000010.md").read_text()
    assert "| a\\|b<br>c | x | 1.000 | 0.500 | correct |" in md


def test_bad_dataset_row_fails_fast_and_writes_nothing(tmp_path):
    from grpo_ray.data.datasets import DataError
    from grpo_ray.driver.train import train

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')
    cfg = load_config(None, ["data.task=jsonl", f"data.train_path={data}", "model.path=/nonexistent",
                             f"run.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: row has no 'answer'"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_held_out_prompts_that_are_training_prompts_are_dropped_before_the_run(tmp_path):
    """An eval file that only repeats training prompts fails before anything is written (the
    partial case, a warning and the rest kept: test_eval_cli's drop_training_prompts test)."""
    from grpo_ray.data.datasets import DataError
    from grpo_ray.driver.train import train

    rows = "".join(json.dumps({"prompt": f"{i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(4))
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "eval.jsonl").write_text(rows.replace("?", "?  "))  # the same prompts, spaced otherwise
    cfg = load_config(None, ["data.task=jsonl", f"data.train_path={tmp_path / 'train.jsonl'}",
                             f"data.eval_path={tmp_path / 'eval.jsonl'}", "model.path=/nonexistent",
                             f"run.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match=r"every held-out prompt is also a training prompt of .*train\.jsonl"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["algo.betta=1"], "algo.betta"),
    (["algo.group_size=-4"], "algo.group_size=-4"),
    (["configs/missing.yaml"], "configs/missing.yaml"),
])
def test_cli_bad_input_exits_2_naming_the_key(args, needle):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "train", *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_two_learner_ranks_zero3_sync_and_save(ray_local, tiny_model_dir, tmp_path):
    """M=2 DeepSpeed ranks (one gloo group across two Ray actors), ZeRO-3: the gathered weights
    reach the generator (its logprobs equal the learner's at the next step) and the saved policy
    has full, updated parameters. Equality with M=1: tests/test_learner_ranks.py."""
    from transformers import AutoModelForCausalLM

    from grpo_ray.driver.train import train

    cfg = load_config("configs/default.yaml", [
        "rollout.prompts_per_step=4", "algo.group_size=4", "train.steps=2", "train.eval_every=0",
        "eval.num_prompts=4", "eval.samples=10", "learner.lr=1e-2", "learner.warmup_steps=0",
        "learner.micro_batch_size=4", "learner.num_ranks=2", "learner.zero_stage=3", f"run.output_dir={tmp_path}", "run.name=z3",
        f"model.path={tiny_model_dir}", "data.task=jsonl", f"data.train_path={_dataset(tmp_path / 't.jsonl')}",
        "data.eval_fraction=0.5"])
    run_dir = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    assert [r["weight_version"] for r in rows] == [0, 1]
    assert all(abs(r["sampler_kl"]) < 1e-4 for r in rows)  # generator == learner after the ZeRO-3 gather
    assert all(r["grad_norm"] > 0 for r in rows)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final_model")).state_dict()
    assert all(final[k].shape == base[k].shape for k in base)
    # a large update, so a sync that failed would show as a sampler/learner mismatch >> 1e-4
    assert max(float((final[k] - base[k]).abs().max()) for k in base) > 5e-3
