"""Multi-turn, tool-using rollouts: the environment interface and its checks, the loss masks of
observation tokens, the Python tool's sandbox, and multi-turn sampling in a real vLLM engine."""
import json

import pytest
import torch

from grpo_ray.config import ConfigError, load_config
from grpo_ray.core.algorithm import loss_normalizer, policy_loss
from grpo_ray.core.records import Rollout, TrainBatch, Trajectory
from grpo_ray.envs import EnvSpec, EnvStep
from grpo_ray.envs.python_tool import PythonTool
from grpo_ray.roles.env_host import EnvHost


# ---------------------------------------------------------------- config and data errors
@pytest.mark.parametrize("name, says", [
    ("calculator", "unknown environment 'calculator'"),
    ("no_such_module_xyz:Env", "module 'no_such_module_xyz' does not import (ModuleNotFoundError"),
    ("env_fns:Missing", "module 'env_fns' has no 'Missing'"),
    ("env_fns:NotAnEnv", "is not an environment class"),
])
def test_a_bad_env_name_fails_at_load_naming_the_key_and_value(name, says):
    with pytest.raises(ConfigError) as e:
        load_config("configs/default.yaml", [f"env.name={name}"])
    assert "env.name" in str(e.value) and repr(name) in str(e.value) and says in str(e.value), str(e.value)


def test_env_limits_are_checked_across_sections():
    with pytest.raises(ConfigError, match="env.turn_tokens=40 is more than rollout.max_new_tokens=16"):
        load_config("configs/default.yaml", ["env.name=python", "env.turn_tokens=40", "reward.pool.mode=serve"])
    with pytest.raises(ConfigError, match="env.options=.*without env.name"):
        load_config("configs/default.yaml", ["env.options={a: 1}"])
    with pytest.raises(ConfigError, match="set env.name=python"):
        load_config("configs/default.yaml", ["data.task=multiply"])


def test_a_row_naming_a_bad_env_is_refused_with_its_line(tmp_path):
    from grpo_ray.data.datasets import DataError, load_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1", "env": "python"}) + "\n"
                    + json.dumps({"prompt": "b", "answer": "2", "env": "env_fns:Nope"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2: env: 'env_fns:Nope': module 'env_fns' has no 'Nope'"):
        load_jsonl(str(path))


# ---------------------------------------------------------------- the env host (a plain class)
def test_env_host_turns_a_raising_or_ill_typed_step_into_an_error_for_that_trajectory():
    host = EnvHost()
    replies = host.reset([("a", EnvSpec("env_fns:Broken", {"mode": "raise"}), {}),
                          ("b", EnvSpec("env_fns:Broken", {"mode": "type"}), {}),
                          ("c", EnvSpec("env_fns:Echo", {"turns": 2}), {})])
    assert [r.error for r in replies] == [None, None, None] and host.open() == 3
    assert host.step("a", "x").step.observation == "\nok\n"
    bad = host.step("a", "x")
    assert bad.step is None and "Broken.step raised KeyError" in bad.error and "env_fns.py" in bad.error
    host.step("b", "x")
    assert host.step("b", "x").error == "Broken.step returned dict, not EnvStep"
    assert host.step("c", "x").step == EnvStep(observation="\n#### 7\n", tool_calls=1)
    host.close(["a", "b", "c"])
    assert host.open() == 0 and "no environment" in host.step("a", "x").error


@pytest.mark.parametrize("returned, says", [
    ("EnvStep(tool_calls=None)", "tool_calls=None"),
    ("EnvStep(reward=float('nan'), done=True)", "reward=nan"),
    ("EnvStep(reward=True, done=True)", "reward=True"),
    ("EnvStep(observation=3)", "observation=3"),
])
def test_env_host_refuses_an_env_step_with_fields_of_the_wrong_kind(returned, says):
    class Odd:
        def reset(self, record):
            return ""

        def step(self, completion):
            return eval(returned)

    host = EnvHost()
    host.envs["k"] = Odd()
    reply = host.step("k", "x")
    assert reply.step is None and says in reply.error and "Odd.step returned EnvStep(" in reply.error


def test_env_host_takes_a_lone_stop_string_as_one_string_and_refuses_others():
    class One:
        stop = "</call>"

        def reset(self, record):
            return ""

        def step(self, completion):
            return EnvStep(done=True)

    class Bad(One):
        stop = ("</call>", 7)

    import env_fns

    host = EnvHost()
    env_fns.One, env_fns.Bad = One, Bad
    ok, bad = host.reset([("a", EnvSpec("env_fns:One"), {}), ("b", EnvSpec("env_fns:Bad"), {})])
    assert ok.stop == ("</call>",) and ok.error is None
    assert "stop must be a string or a tuple of non-empty strings" in bad.error


def test_env_host_drops_environments_left_idle():
    host = EnvHost(idle_s=0.0)
    host.reset([("old", EnvSpec("env_fns:Echo"), {})])
    host.reset([("new", EnvSpec("env_fns:Echo"), {})])  # the sweep at this reset drops "old"
    assert set(host.envs) == {"new"}


def test_env_host_gives_max_turns_to_an_environment_that_takes_it():
    host = EnvHost(max_turns=3)
    host.reset([("k", EnvSpec("code_feedback"), {"tests": "assert f() == 1"})])
    assert host.envs["k"].max_turns == 3


# ---------------------------------------------------------------- observation tokens in the loss
def _multiturn_batch(seed=0):
    """Two prompts x 2 completions; completion 1 and 2 have observation spans in the middle."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    responses = [[int(x) for x in torch.randint(10, 40, (n,), generator=g)] for n in (6, 9, 7, 3)]
    trajs = [Trajectory(), Trajectory(turns=2, observations=[(3, 6)]),
             Trajectory(turns=3, observations=[(1, 3), (4, 6)]), Trajectory()]
    logps = [[-float(x) for x in torch.rand(len(r), generator=g) + 0.5] for r in responses]
    for t, lp in zip(trajs, logps):  # the sampler gives observation tokens no logprob
        for s, e in t.observations:
            lp[s:e] = [0.0] * (e - s)
    rollout = Rollout(prompts, responses, logps, [""] * 4, [False] * 4, trajectories=trajs)
    return TrainBatch.from_rollout(rollout, torch.tensor([1.0, -0.5, 0.8, -1.3]), pad_id=0)


def _tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1)).float()


def _loss_and_grads(model, batch, aggregation, rows=None, normalizer=None):
    from grpo_ray.models.modeling import response_logprobs

    mb = batch if rows is None else batch.select(rows)
    logp, _ = response_logprobs(model, mb, share_prompts=True)
    loss, _ = policy_loss(logp, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.response_mask, eps_low=0.2,
                          eps_high=0.28, beta=0.04, aggregation=aggregation, normalizer=normalizer)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss.detach(), grads


def test_observation_tokens_are_masked_out_of_the_loss():
    batch = _multiturn_batch()
    assert batch.response_mask[1].tolist()[:9] == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert batch.response_mask[2].tolist()[:7] == [1, 0, 0, 1, 0, 0, 1]
    assert loss_normalizer(batch.response_mask, "token_mean") == 6 + 6 + 3 + 3  # model tokens only


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "constant"])
def test_observation_tokens_get_exactly_zero_gradient(aggregation):
    """Changing the observation tokens' old and reference logprobs changes neither the loss nor
    any weight's gradient (they are in the sequence, as context, and in nothing else)."""
    model = _tiny_lm()
    batch = _multiturn_batch()
    batch.ref_logprobs = batch.old_logprobs - 0.05
    base_loss, base_grads = _loss_and_grads(model, batch, aggregation)
    obs = batch.attention_mask[:, batch.prompt_len:].bool() & ~batch.response_mask.bool()
    assert int(obs.sum()) == 7
    moved = TrainBatch(**{**vars(batch)})
    moved.old_logprobs = batch.old_logprobs.masked_fill(obs, -30.0)
    moved.ref_logprobs = batch.ref_logprobs.masked_fill(obs, 5.0)
    loss, grads = _loss_and_grads(model, moved, aggregation)
    assert torch.equal(loss, base_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, base_grads))
    assert any(float(g.abs().max()) > 0 for g in grads)  # the model's own tokens do train


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "constant"])
def test_masked_trajectories_keep_the_gradient_split_invariant(aggregation):
    model = _tiny_lm()
    batch = _multiturn_batch(seed=1)
    batch.ref_logprobs = batch.old_logprobs - 0.05
    norm = loss_normalizer(batch.response_mask, aggregation, max_tokens=9)
    _, full = _loss_and_grads(model, batch, aggregation, normalizer=norm)
    for cuts in ([0, 1, 4], [0, 2, 3, 4], [0, 3, 4]):
        parts = [_loss_and_grads(model, batch, aggregation, torch.arange(a, b), norm)[1] for a, b in zip(cuts, cuts[1:])]
        summed = [sum(p[i] for p in parts) for i in range(len(full))]
        assert all(torch.allclose(s, f, atol=1e-6) for s, f in zip(summed, full)), cuts


# ---------------------------------------------------------------- the Python tool, in the sandbox
def test_python_tool_runs_the_block_and_returns_its_output():
    tool = PythonTool(timeout_s=5.0)
    assert tool.stop == ("```output",)
    step = tool.step(" ```python\nprint(347*86)\n```\n```output")
    assert step == EnvStep(observation="\n29842\n```\n", tool_calls=1)
    err = tool.step("```python\nprint(1/0)\n```\n```output")
    assert err.observation == "\nZeroDivisionError: division by zero\n```\n" and err.tool_errors == 1
    assert tool.step(" #### 29842").done  # no block: the final answer
    assert tool.step("```python\nprint(1)\n```").done  # a block the model did not ask to run


@pytest.mark.parametrize("code, says, within_s", [
    ("import os\nwhile True:\n    os.fork()", "", 10.0),  # fork bomb: any error (EAGAIN, a limit)
    ("while True:\n    pass", "error: timeout after 2.0s", 6.0),            # infinite loop
    ("x = bytearray(10**10)", "error: memory limit", 6.0),                          # memory bomb
    ("while True:\n    print('x' * 10000)", "error: the output passed its size limit", 6.0),  # output flood
])
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "fresh"])
def test_hostile_tool_calls_end_with_an_error_observation_within_their_limit(code, says, within_s, warm):
    import time

    tool = PythonTool(timeout_s=2.0, memory_mb=256, warm=warm)
    start = time.monotonic()
    step = tool.step(f"```python\n{code}\n```\n```output")
    assert time.monotonic() - start < within_s
    assert says in step.observation and step.tool_errors == 1 and not step.done, step
    assert len(step.observation) < 400
    assert tool.step("```python\nprint(6*7)\n```\n```output").observation == "\n42\n```\n"  # the next call is fine


def test_code_feedback_feeds_back_the_visible_tests_then_scores_the_full_ones():
    from grpo_ray.envs.code_feedback import CodeFeedback

    record = {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4"}
    env = CodeFeedback(max_turns=3)
    assert env.reset(record) == ""
    wrong = env.step("```python\ndef add(a, b):\n    return a - b\n```")
    assert not wrong.done and wrong.observation.startswith("\nThe tests failed:") and wrong.tool_calls == 1
    half = env.step("```python\ndef add(a, b):\n    return 3 if a == 1 else 0\n```")  # passes the visible test only
    assert half.done and half.reward == 0.0
    env.reset(record)
    assert env.step("```python\ndef add(a, b):\n    return a + b\n```") == EnvStep(reward=1.0, done=True, tool_calls=1)
    env = CodeFeedback(max_turns=2)
    env.reset(record)
    env.step("def add(a, b): return 0")
    last = env.step("def add(a, b): return 0")  # the last turn: scored on the full tests, no feedback
    assert last.done and last.reward == 0.0


# --------------------------------------------------------------------------- the tool task (multiply)
def test_multiply_task_splits_by_pair_and_keeps_products_of_one_length():
    from grpo_ray.data.tasks import multiply_records

    train, held = multiply_records(99, seed=0, eval_fraction=0.1, size=2000)
    assert len(train) == 1800 and len(held) == 200
    assert not {(r["a"], r["b"]) for r in train} & {(r["a"], r["b"]) for r in held}
    for r in train[:50] + held[:50]:
        assert r["prompt"] == f"Q: {r['a']}*{r['b']}=?\nA:" and r["answer"] == str(r["a"] * r["b"])
        assert 100 <= r["a"] <= 999 and 10 <= r["b"] <= 99 and len(r["answer"]) == 5
    assert multiply_records(99, seed=0, eval_fraction=0.1, size=2000) == (train, held)


def test_multiply_warm_start_trains_on_the_model_turns_only(tiny_model_dir):
    """The observation is tokenised on its own (as the generator appends it) and carries no loss."""
    from transformers import AutoTokenizer

    from grpo_ray.data.tasks import tool_observation
    from grpo_ray.models.warmstart import multiply_segments, segment_batch

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rec = {"prompt": "Q: 347*86=?\nA:", "a": 347, "b": 86}
    segs = multiply_segments(tok, rec, use_tool=True)
    assert [w[0] for _, w in segs] == [0.0, 1.0, 0.0, 1.0]
    assert segs[2][0] == tok(tool_observation("29842"))["input_ids"]
    assert segs[3][0][-1] == tok.eos_token_id
    ids, mask, labels, weights = segment_batch(tok, [segs, multiply_segments(tok, rec, use_tool=False, guess=12345)])
    n0, n2 = len(segs[0][0]), len(segs[0][0]) + len(segs[1][0])
    assert (labels[0, :n0] == -100).all() and (labels[0, n2:n2 + len(segs[2][0])] == -100).all()
    assert (labels[0, n0:n2] >= 0).all() and int(mask[0].sum()) == sum(len(s) for s, _ in segs)
