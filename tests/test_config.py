"""Tests for grpo_ray/config/ (the pydantic config tree): defaults, YAML + dotted overrides, and error messages."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from grpo_ray.config import Config, ConfigError, load_config, parse_override
from grpo_ray.config.sections import EvalSetConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_YAML = REPO / "configs" / "default.yaml"


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --------------------------------------------------------------------------- defaults


def test_defaults_are_deepseek_r1_recipe():
    cfg = load_config()
    assert cfg.algo.group_size == 16
    assert cfg.algo.epsilon == 10.0
    assert cfg.algo.epsilon_high is None
    assert cfg.epsilon_high == 10.0
    assert cfg.algo.beta == 0.001
    assert cfg.rollout.temperature == 1.0
    assert cfg.algo.kl_stop == 0.1


def test_epsilon_high_follows_epsilon_unless_set():
    assert load_config(None, ["algo.epsilon=0.2"]).epsilon_high == 0.2
    cfg = load_config(None, ["algo.epsilon=0.2", "algo.epsilon_high=0.28"])
    assert cfg.algo.epsilon == 0.2
    assert cfg.epsilon_high == 0.28
    # explicit null restores "same as epsilon"
    cfg = load_config(None, ["algo.epsilon_high=0.28", "algo.epsilon_high=null"])
    assert cfg.algo.epsilon_high is None
    assert cfg.epsilon_high == 10.0


def test_to_dict_round_trips_sections():
    d = load_config(None, ["algo.beta=0.5"]).to_dict()
    assert d["algo"]["beta"] == 0.5
    assert d["algo"]["group_size"] == 16
    assert set(d) == {"run", "model", "warmstart", "data", "algo", "reward", "rollout", "learner", "train", "eval",
                      "resources", "env", "sync"}


# --------------------------------------------------------------------------- loading


def test_load_default_yaml():
    """Every value in configs/default.yaml lands in the config; every other key keeps its default.
    (Compared with the file itself, so retuning the file does not break the test.)"""
    assert DEFAULT_YAML.is_file()
    cfg = load_config(str(DEFAULT_YAML))
    assert isinstance(cfg, Config)
    data = yaml.safe_load(DEFAULT_YAML.read_text())
    assert data, "default.yaml is empty"
    got, defaults = cfg.to_dict(), Config().to_dict()
    for section, values in defaults.items():
        for key, default in values.items():
            expected = data.get(section, {}).get(key, default)
            if isinstance(default, dict) and key in data.get(section, {}):  # a subsection: the file's keys over its defaults
                expected = {**default, **expected}
            if section == "eval" and key == "sets":  # each set's keys not in the file keep their defaults
                expected = [{**EvalSetConfig(**s).model_dump(), **s} for s in expected]
            assert got[section][key] == expected, f"{section}.{key}"
    assert cfg.data.task == "arithmetic"
    # the default job watches a skill GRPO does not train, which its warm start teaches
    assert cfg.warmstart.subtract > 0 and [(s.task, s.retention) for s in cfg.eval.sets] == [("subtract", True)]
    assert cfg.model.path == "builtin:tiny"


def test_yaml_nested_key_then_overrides_in_order(tmp_path):
    path = write_yaml(tmp_path, "algo:\n  beta: 0.01\n  group_size: 8\nrollout:\n  temperature: 0.7\n")
    cfg = load_config(path)
    assert cfg.algo.beta == 0.01
    assert cfg.algo.group_size == 8
    assert cfg.rollout.temperature == 0.7
    assert cfg.algo.epsilon == 10.0  # sibling keys untouched

    cfg = load_config(path, ["algo.beta=0.02", "rollout.temperature=0.9", "algo.beta=0.03"])
    assert cfg.algo.beta == 0.03  # later override wins over earlier override and over the file
    assert cfg.rollout.temperature == 0.9
    assert cfg.algo.group_size == 8  # file value not overridden survives


def test_int_accepted_for_float_fields(tmp_path):
    cfg = load_config(None, ["algo.beta=1", "learner.lr=2"])
    assert cfg.algo.beta == 1.0 and isinstance(cfg.algo.beta, float)
    assert cfg.learner.lr == 2.0 and isinstance(cfg.learner.lr, float)
    path = write_yaml(tmp_path, "algo:\n  epsilon: 3\n")
    cfg = load_config(path)
    assert cfg.algo.epsilon == 3.0 and isinstance(cfg.algo.epsilon, float)


def test_empty_yaml_file_gives_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, ""))
    assert cfg.algo.group_size == 16


def test_jsonl_task_with_train_path_and_hf_model():
    cfg = load_config(None, ["data.task=jsonl", "data.train_path=/tmp/x.jsonl", "model.path=/models/qwen"])
    assert cfg.data.task == "jsonl"
    assert cfg.data.train_path == "/tmp/x.jsonl"


# --------------------------------------------------------------------------- parse_override


@pytest.mark.parametrize("text,expected", [
    ("algo.beta=0.01", ("algo.beta", 0.01)),
    ("algo.group_size=8", ("algo.group_size", 8)),
    ("eval.ks=[1, 4]", ("eval.ks", [1, 4])),
    ("algo.epsilon_high=null", ("algo.epsilon_high", None)),
    ("run.name=a=b", ("run.name", "a=b")),  # split on the first '=' only
    ("run.name=", ("run.name", "")),
    (" algo.beta =0.5", ("algo.beta", 0.5)),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("override,key,expected", [
    ("run.name=0123", "run.name", "0123"),  # YAML: the octal 83
    ("run.name=1e3", "run.name", "1e3"),  # YAML: 1000.0
    ("run.name=true", "run.name", "true"),
    ("data.prompt_template=Q: {prompt} A:", "prompt_template", "Q: {prompt} A:"),  # YAML: a mapping
    ("data.prompt_template='Q: {prompt}'", "prompt_template", "Q: {prompt}"),  # quoted: unquoted as YAML
    ("data.prompt_template=#{prompt}", "prompt_template", "#{prompt}"),  # YAML: a comment, so ""
    ("run.name=a b ", "run.name", "a b "),
])
def test_text_keys_take_the_override_as_typed(override, key, expected):
    cfg = load_config(None, [override])
    section = cfg.run if override.startswith("run.") else cfg.data
    assert getattr(section, key.split(".")[-1]) == expected


def test_non_text_overrides_are_still_yaml():
    cfg = load_config(None, ["algo.beta=0.5", "eval.ks=[1, 2]", "reward.components.format=0.5",
                             "algo.aggregation=token_mean", "algo.epsilon_high=null"])
    assert (cfg.algo.beta, cfg.eval.ks, cfg.algo.epsilon_high) == (0.5, [1, 2], None)
    assert cfg.algo.aggregation == "token_mean"
    assert cfg.reward.components == {"correct": 1.0, "format": 0.5}
    with pytest.raises(ConfigError, match="algo.aggregation='seq'"):
        load_config(None, ["algo.aggregation=seq"])


def test_the_reference_runs_while_the_kl_term_or_the_kl_guard_needs_it():
    assert load_config(None, []).uses_reference
    assert load_config(None, ["algo.beta=0"]).uses_reference  # the guard still measures the KL
    assert load_config(None, ["algo.kl_stop=null"]).uses_reference  # the loss's KL term
    assert not load_config(None, ["algo.beta=0", "algo.kl_stop=null"]).uses_reference
    for key in ("algo.ref_reset_every=10", "algo.kl_action=rollback"):
        with pytest.raises(ConfigError, match=f"{key} needs a reference policy.*set algo.kl_stop"):
            load_config(None, ["algo.beta=0", "algo.kl_stop=null", key])
    # a reference inside the learner ranks has no device of its own to use
    with pytest.raises(ConfigError, match="resources.reference_host=learner.*reference_gpus=1.0 would be unused"):
        load_config(None, ["resources.reference_host=learner", "resources.reference_gpus=1"])
    assert load_config(None, ["resources.reference_gpus=1"]).reference_actor  # auto: then an actor


def test_parse_override_without_equals():
    with pytest.raises(ConfigError, match="algo.beta") as e:
        parse_override("algo.beta")
    assert "dotted.key=value" in str(e.value)


def test_override_without_equals_in_load_config():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["algo.group_size"])


def test_override_invalid_yaml_value():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("eval.ks=[1, 2")


# --------------------------------------------------------------------------- errors


def test_unknown_key_in_file_names_key_path_and_suggestion(tmp_path):
    path = write_yaml(tmp_path, "algo:\n  betta: 0.01\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "algo.betta" in msg
    assert path in msg
    assert "did you mean 'algo.beta'" in msg


def test_unknown_top_level_section_in_file(tmp_path):
    path = write_yaml(tmp_path, "zzzqqq:\n  a: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "zzzqqq" in msg and path in msg
    assert "known keys" in msg and "algo" in msg


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algo.gruop_size=8"])
    msg = str(e.value)
    assert "algo.gruop_size" in msg
    assert "command line" in msg
    assert "did you mean 'algo.group_size'" in msg


def test_negative_group_size():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algo.group_size=-4"])
    msg = str(e.value)
    assert "algo.group_size" in msg
    assert "-4" in msg
    assert ">= 2" in msg


def test_group_size_lower_bound_is_inclusive():
    assert load_config(None, ["algo.group_size=2"]).algo.group_size == 2
    with pytest.raises(ConfigError, match="algo.group_size"):
        load_config(None, ["algo.group_size=1"])


def test_open_lower_bound_rejects_zero():
    with pytest.raises(ConfigError, match=r"algo\.epsilon=0.*must be > 0"):
        load_config(None, ["algo.epsilon=0"])
    with pytest.raises(ConfigError, match=r"rollout\.temperature"):
        load_config(None, ["rollout.temperature=0"])
    # beta has a closed bound: 0 is allowed (no KL penalty)
    assert load_config(None, ["algo.beta=0"]).algo.beta == 0.0


def test_upper_bound():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.top_p=1.5"])
    assert "rollout.top_p" in str(e.value) and "1.5" in str(e.value) and "<= 1.0" in str(e.value)
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=512 leaves no room for the prompt"):
        load_config(None, ["rollout.max_new_tokens=512", "rollout.max_model_len=512"])
    # nucleus sampling: vLLM's logprobs are the renormalised nucleus's, not the learner's softmax
    with pytest.raises(ConfigError, match="rollout.top_p=0.9 .*algo.recompute_old_logprobs=true"):
        load_config(None, ["rollout.top_p=0.9"])
    assert load_config(None, ["rollout.top_p=0.9", "algo.recompute_old_logprobs=true",
                              "algo.tis=token"]).rollout.top_p == 0.9


def test_bad_value_in_file_names_file(tmp_path):
    path = write_yaml(tmp_path, "algo:\n  group_size: -4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "algo.group_size" in msg and "-4" in msg and path in msg


def test_wrong_type():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algo.beta=abc"])
    msg = str(e.value)
    assert "algo.beta" in msg and "abc" in msg
    assert "expected float" in msg


def test_bool_not_accepted_for_int():
    with pytest.raises(ConfigError, match=r"algo\.group_size.*expected int, got bool"):
        load_config(None, ["algo.group_size=true"])


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match=r"algo .*expected a mapping"):
        load_config(None, ["algo=5"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algo.aggregation=foo"])
    msg = str(e.value)
    assert "algo.aggregation" in msg and "foo" in msg
    for allowed in ("seq_mean", "token_mean", "constant"):
        assert allowed in msg


def test_eval_ks_larger_than_samples():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.samples=4"])  # default ks = [1, 10]
    msg = str(e.value)
    assert "eval.ks" in msg and "eval.samples" in msg and "10" in msg
    # equal is fine
    assert load_config(None, ["eval.samples=10"]).eval.samples == 10


def test_eval_ks_must_be_positive_ints():
    with pytest.raises(ConfigError, match="eval.ks"):
        load_config(None, ["eval.ks=[0, 1]"])
    with pytest.raises(ConfigError, match="eval.ks"):
        load_config(None, ["eval.ks=[1.5]"])


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert missing in str(e.value)
    assert "does not exist" in str(e.value)


def test_invalid_yaml_file(tmp_path):
    path = write_yaml(tmp_path, "algo:\n  beta: [0.1\n  group_size: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value)
    assert "not valid YAML" in str(e.value)


def test_jsonl_task_needs_train_path():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.task=jsonl"])
    assert "data.train_path" in str(e.value)


def test_builtin_tiny_needs_arithmetic():
    with pytest.raises(ConfigError, match="builtin:tiny"):
        load_config(None, ["data.task=jsonl", "data.train_path=x.jsonl"])


def test_num_ranks_must_divide_batch():
    with pytest.raises(ConfigError, match=r"algo.mini_batches \* learner.num_ranks = 3 must divide"):
        load_config(None, ["learner.num_ranks=3"])  # 16 * 16 = 256 is not divisible by 3
    assert load_config(None, ["learner.num_ranks=4"]).learner.num_ranks == 4
    with pytest.raises(ConfigError, match=r"= 512 must divide .* = 256"):
        load_config(None, ["learner.num_ranks=2", "algo.mini_batches=256"])
    assert load_config(None, ["learner.num_ranks=2", "algo.mini_batches=16"]).algo.mini_batches == 16


def test_tis_needs_recomputed_old_logprobs():
    with pytest.raises(ConfigError, match="algo.tis='token' needs algo.recompute_old_logprobs=true"):
        load_config(None, ["algo.tis=token"])
    cfg = load_config(None, ["algo.tis=sequence", "algo.recompute_old_logprobs=true"])
    assert (cfg.algo.tis, cfg.algo.tis_cap) == ("sequence", 2.0)
    with pytest.raises(ConfigError, match="algo.tis_cap=0.5"):
        load_config(None, ["algo.tis_cap=0.5"])


def test_overlong_buffer_default_and_bound():
    from grpo_ray.config import overlong_buffer

    assert overlong_buffer(load_config(None, ["rollout.max_new_tokens=20"])) == 4
    with pytest.raises(ConfigError, match="algo.overlong_buffer=30 is longer than rollout.max_new_tokens=20"):
        load_config(None, ["rollout.max_new_tokens=20", "algo.overlong=penalty", "algo.overlong_buffer=30"])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- known bugs


def test_scientific_notation_override():
    assert load_config(None, ["algo.beta=1e-3"]).algo.beta == pytest.approx(1e-3)


def test_empty_eval_ks_names_key():
    with pytest.raises(ConfigError, match="eval.ks"):
        load_config(None, ["eval.ks=[]"])


def test_nan_rejected():
    with pytest.raises(ConfigError, match="algo.epsilon"):
        load_config(None, ["algo.epsilon=.nan"])


def test_async_rollouts_with_dynamic_sampling_is_an_error():
    with pytest.raises(ConfigError, match="rollout.asynchronous=true does not work with algo.dynamic_sampling"):
        load_config(None, ["rollout.asynchronous=true", "algo.dynamic_sampling=true"])
    assert load_config(None, ["rollout.asynchronous=true"]).rollout.asynchronous


def test_vllm_cpu_threads_list():
    from grpo_ray.config import cpu_list

    assert cpu_list("0-1") == [0, 1] and cpu_list("0-3,8") == [0, 1, 2, 3, 8] and cpu_list("") == []
    with pytest.raises(ConfigError, match="resources.vllm_cpu_threads='one'"):
        load_config(None, ["resources.vllm_cpu_threads=one"])


@pytest.mark.parametrize("overrides,cpus,peer,want", [
    ([], 2, (0, 1), ("0-1", 2)),                                  # sync: every role gets every core
    (["rollout.asynchronous=true"], 2, (0, 1), ("0-0", 1)),       # async: generator and training split them
    (["rollout.asynchronous=true"], 16, (0, 1), ("0-7", 8)),
    (["rollout.asynchronous=true"], 1, (0, 1), ("0-0", 1)),       # nothing to split
    (["rollout.asynchronous=true", "resources.generator_gpus=1"], 8, (0, 1), ("0-7", 8)),  # vLLM on a GPU
    (["rollout.asynchronous=true", "resources.vllm_cpu_threads=0-2", "resources.torch_threads=3"], 2, (0, 1),
     ("0-2", 3)),
    ([], 2, (1, 2), ("1-1", 1)),                                  # two generators (or ranks) on a node: a core each
    ([], 8, (2, 3), ("5-7", 2)),                                  # uneven slices, still disjoint
    (["rollout.asynchronous=true"], 16, (1, 2), ("4-7", 4)),      # the generators' half, split again
    ([], 2, (2, 3), ("0-0", 1)),                                  # more instances than cores wrap around
])
def test_auto_cpu_threads(overrides, cpus, peer, want):
    from grpo_ray.config import cpu_threads

    assert load_config(None, overrides).resources.vllm_cpu_threads == ("auto" if len(overrides) < 3 else "0-2")
    assert cpu_threads(load_config(None, overrides), cpus, *peer) == want


def test_auto_cpu_slices_are_disjoint_and_cover_the_node():
    from grpo_ray.config import cpu_list, cpu_threads

    cfg = load_config(None, [])
    for cpus in (2, 3, 8, 13):
        for k in range(1, cpus + 1):
            ids = [i for p in range(k) for i in cpu_list(cpu_threads(cfg, cpus, p, k)[0])]
            assert sorted(ids) == list(range(cpus)), (cpus, k)


@pytest.mark.parametrize("overrides,needle", [
    (["rollout.asynchronous=true", "algo.recompute_old_logprobs=true"], "needs algo.tis=token or sequence"),
    (["learner.num_ranks=2", "resources.learner_gpus=0.5"], "two ranks could share one GPU"),
    (["data.verifier=maths"], "data.verifier='maths': expected math, code, or module:function"),
])
def test_resource_and_async_combinations_that_cannot_work(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, overrides)


def test_a_key_given_twice_in_a_config_file_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  beta: 0.1\nrun:\n  name: x\nalgo:\n  epsilon: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'algo' appears twice in one mapping \(line 5\)"):
        load_config(str(path))  # PyYAML alone keeps the second block and drops beta silently


@pytest.mark.parametrize("override,needle", [
    ("run.name=../x", "run.name='../x': expected one folder name"),
    ("run.name=.", "run.name='.': expected one folder name"),
    ("resources.vllm_cpu_threads=3-1", "resources.vllm_cpu_threads='3-1': expected CPU ids"),
])
def test_run_name_is_one_folder_and_cpu_ids_are_not_empty(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, [override])


# --------------------------------------------------------------------------- pydantic tree, sources, CLI


def test_errors_name_the_file_line_and_list_every_problem(tmp_path):
    path = write_yaml(tmp_path, "run:\n  name: x\nalgo:\n  group_size: -4\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"algo.group_size=-4 ({path}:4): must be >= 2" in msg
    assert f"unknown config key 'algo.betta' ({path}:5); did you mean 'algo.beta'?" in msg


def test_errors_spanning_keys_name_each_keys_source(tmp_path):
    path = write_yaml(tmp_path, "eval:\n  samples: 4\n")
    with pytest.raises(ConfigError, match=re.escape(f"[eval.ks: default; eval.samples: {path}:2]")):
        load_config(path)
    with pytest.raises(ConfigError, match=re.escape("[algo.tis: command line; algo.recompute_old_logprobs: "
                                                    "default]")):
        load_config(path, ["eval.samples=10", "algo.tis=token"])


def test_unknown_key_in_the_wrong_section_points_to_the_right_one():
    with pytest.raises(ConfigError, match=re.escape("'algo.temperature' (command line); did you mean "
                                                    "'rollout.temperature'?")):
        load_config(None, ["algo.temperature=0.5"])


def test_bad_choice_suggests_the_closest_allowed_value():
    with pytest.raises(ConfigError, match="did you mean 'seq_mean'"):
        load_config(None, ["algo.aggregation=seq"])


def test_allowed_choices_come_from_the_algorithm_module():
    from grpo_ray.config import AlgoConfig
    from grpo_ray.core.algorithm import AGGREGATIONS, ESTIMATORS, TIS_LEVELS

    schema = AlgoConfig.model_json_schema()["properties"]
    assert tuple(schema["estimator"]["enum"]) == ESTIMATORS
    assert tuple(schema["aggregation"]["enum"]) == AGGREGATIONS
    assert tuple(schema["tis"]["enum"]) == ("none", *TIS_LEVELS)


def test_a_component_named_by_a_dotted_module_path_is_one_key():
    cfg = load_config(None, ["reward.components.mypkg.rewards:fn=0.5"])
    assert cfg.reward.components == {"correct": 1.0, "mypkg.rewards:fn": 0.5}
    with pytest.raises(ConfigError, match=r"reward.components key 'a\.b'"):  # not the nested keys a -> b
        load_config(None, ["reward.components.a.b=1"])


def test_config_pickles_and_keeps_its_values():
    import pickle

    cfg = load_config(None, ["algo.beta=0.5", "reward.components.format=0.1"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert vars(cfg.reward.math) == {"extraction": "any", "timeout_s": 5.0}


def test_config_schema_command_validates_the_shipped_configs(capsys):
    import json

    import jsonschema

    from grpo_ray.cli import main

    main(["config", "schema"])
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    algo = schema["$defs"]["AlgoConfig"]["properties"]
    assert algo["group_size"]["minimum"] == 2 and "completions per prompt" in algo["group_size"]["description"]
    for bad in ({"algo": {"betta": 0.1}}, {"algo": {"epsilon_high": 0}}, {"algo": {"aggregation": "seq"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_config_show_prints_each_value_with_its_source(tmp_path, capsys):
    from grpo_ray.cli import main

    path = write_yaml(tmp_path, "algo:\n  beta: 0.01\n  group_size: 8\nreward:\n  components: {format: 0.1}\n")
    main(["config", "show", path, "algo.beta=0.02", "run.name=0123"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "  beta: 0.02  # command line" in lines
    assert f"  group_size: 8  # {path}:3" in lines
    assert "  epsilon: 10.0  # default" in lines
    assert f"    format: 0.1  # {path}:5" in lines and "    correct: 1.0  # default" in lines
    assert "  name: '0123'  # command line" in lines
    cfg = load_config(path, ["algo.beta=0.02", "run.name=0123"])
    assert yaml.safe_load(out) == cfg.to_dict()  # valid YAML: the resolved config itself


def test_an_unknown_learner_backend_is_refused_before_any_actor_starts(tmp_path):
    """learner.backend is checked against the backends' registry by train()'s pre-checks."""
    from grpo_ray.driver.train import train

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "learner.backend=fsdp9"])
    with pytest.raises(ConfigError, match=r"learner.backend='fsdp9': allowed values are 'deepspeed'"):
        train(cfg)
    assert not (tmp_path / cfg.run.name).exists()  # nothing written
