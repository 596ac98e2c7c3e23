"""No silent failure: a crash's half-written metrics line, an empty metrics file, a model folder
that cannot work (no tokenizer, no weights, a broken config.json, a context shorter than
rollout.max_model_len), and the CLI's split between the user's errors (one line, exit 2) and
bugs (the full traceback, exit 1, and the run directory's error.log)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_ray.driver.plots import load_metrics, plot_run
from grpo_ray.driver.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
PARTIAL = '{"step": 3, "reward/me'  # a crash (or a full disk) in the middle of a write


def _metrics(run, text):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text(text)
    return run / "metrics.jsonl"


def _record(step):
    return json.dumps({"step": step, "reward/mean": 0.1 * step, "reward/std": 0.5}) + "\n"


# --------------------------------------------------------------------------- metrics.jsonl


def test_a_resumed_run_cuts_a_partial_last_line_and_says_so(tmp_path, capsys):
    path = _metrics(tmp_path / "run", _record(1) + _record(2) + PARTIAL)
    tracker = Tracker(str(tmp_path / "run"), tensorboard=False, resumed=True)
    tracker.write({"step": 3, "event": "resume", "message": "checkpoints/step_000002"})
    tracker.write({"step": 3, "reward/mean": 0.3, "reward/std": 0.5})
    tracker.close()
    lines = [json.loads(line) for line in open(path)]  # every line is a record: nothing glued
    assert [r["step"] for r in lines] == [1, 2, 3, 3]
    err = capsys.readouterr().err
    assert str(path) in err and f"{len(PARTIAL)} bytes" in err and "partial" in err


def test_a_last_record_without_its_newline_is_kept(tmp_path, capsys):
    path = _metrics(tmp_path / "run", _record(1) + _record(2).rstrip("\n"))
    tracker = Tracker(str(tmp_path / "run"), tensorboard=False, resumed=True)
    tracker.write({"step": 3, "reward/mean": 0.3})
    tracker.close()
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]


def test_a_whole_metrics_file_is_left_alone(tmp_path, capsys):
    text = _record(1) + _record(2)
    path = _metrics(tmp_path / "run", text)
    Tracker(str(tmp_path / "run"), tensorboard=False, resumed=True).close()
    assert path.read_text() == text and capsys.readouterr().err == ""


def test_plot_skips_a_partial_final_line_with_a_warning(tmp_path, capsys):
    path = _metrics(tmp_path / "run", _record(1) + _record(2) + PARTIAL)
    train, _ = load_metrics(str(tmp_path / "run"))
    assert train["step"].tolist() == [1, 2]
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "partial" in err
    assert plot_run(str(tmp_path / "run"))  # and the charts are drawn


def test_plot_keeps_the_record_glued_to_a_partial_line_with_a_warning(tmp_path):
    """A run before the resume fix appended the next record to the partial line: `grpo-ray plot`
    (and the plots at the end of training) failed on that line until it was fixed by hand."""
    path = _metrics(tmp_path / "run", _record(1) + PARTIAL + _record(2) + "not json\n" + _record(3))
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "plot", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{path}:2: kept the record appended to a partial one" in proc.stderr
    assert f"{path}:3: skipped a line that is not valid JSON" in proc.stderr
    train, _ = load_metrics(str(tmp_path / "run"))
    assert train["step"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("text", ["", "\n", json.dumps({"step": 1, "event": "resume", "message": "x"}) + "\n"])
def test_plot_of_a_run_with_no_records_says_nothing_to_plot_yet(tmp_path, text):
    _metrics(tmp_path / "run", text)
    train, evals = load_metrics(str(tmp_path / "run"))
    assert len(train) == 0 and len(evals) == 0
    proc = subprocess.run([sys.executable, "-m", "grpo_ray.cli", "plot", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nothing to plot yet" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- model folders


def _copy(src, dst, names):
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


MODEL_FILES = ["config.json", "model.safetensors"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]


def test_a_model_folder_passes_the_check(tiny_model_dir):
    from grpo_ray.models.modeling import check_model_dir

    check_model_dir(tiny_model_dir)
    check_model_dir(tiny_model_dir, max_model_len=512)


def test_a_model_folder_without_tokenizer_is_refused_naming_it(tiny_model_dir, tmp_path):
    """transformers builds an empty tokenizer for such a folder that encodes every prompt to
    nothing: vLLM then said 'The decoder prompt cannot be empty' after 40 s of starting actors."""
    from grpo_ray.models.modeling import ModelDirError, check_model_dir

    folder = _copy(tiny_model_dir, tmp_path / "m", MODEL_FILES)
    with pytest.raises(ModelDirError) as e:
        check_model_dir(folder)
    msg = str(e.value)
    assert folder in msg and "no tokenizer" in msg and "tokenizer.json" in msg and "save_pretrained" in msg
    assert isinstance(e.value, ValueError) and "\n" not in msg


def test_a_tokenizer_that_encodes_to_nothing_is_refused(tiny_model_dir, tmp_path):
    from grpo_ray.models.modeling import ModelDirError, check_model_dir

    folder = _copy(tiny_model_dir, tmp_path / "m", MODEL_FILES)
    (tmp_path / "m" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>"}))
    with pytest.raises(ModelDirError, match="encodes .* to no tokens"):
        check_model_dir(folder)


def test_the_tokenizer_check_reads_tokenizer_json_without_transformers(tiny_model_dir):
    """transformers' import was ~2.4 s of every model-folder run's start-up, spent on a check
    the `tokenizers` library does alone for a fast tokenizer; the ids are the same."""
    code = (f"import sys; from grpo_ray.models.modeling import check_model_dir; check_model_dir({tiny_model_dir!r}); "
            "print('transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["False"], proc.stderr
    from tokenizers import Tokenizer

    from grpo_ray.models.modeling import PROBE_PROMPT, load_tokenizer

    fast = Tokenizer.from_file(os.path.join(tiny_model_dir, "tokenizer.json")).encode(PROBE_PROMPT).ids
    assert fast and fast == load_tokenizer(tiny_model_dir)(PROBE_PROMPT)["input_ids"]


@pytest.mark.parametrize("broken", ["tokenizer.json", "tokenizer_config.json", "empty vocabulary"])
def test_a_broken_tokenizer_json_is_refused_naming_the_folder(tiny_model_dir, tmp_path, broken):
    from tokenizers import Tokenizer, models

    from grpo_ray.models.modeling import ModelDirError, check_model_dir

    folder = _copy(tiny_model_dir, tmp_path / "m", MODEL_FILES + TOKENIZER_FILES)
    if broken == "empty vocabulary":
        Tokenizer(models.BPE(vocab={}, merges=[])).save(os.path.join(folder, "tokenizer.json"))
    else:
        (tmp_path / "m" / broken).write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelDirError) as e:
        check_model_dir(folder)
    msg = str(e.value)
    assert folder in msg and "save_pretrained" in msg and "\n" not in msg
    assert {"tokenizer.json": "its tokenizer does not load (",
            "tokenizer_config.json": "tokenizer_config.json is not JSON",
            "empty vocabulary": "to no tokens"}[broken] in msg


@pytest.mark.parametrize("case, full", [
    ("plain", False), ("added tokens as save_pretrained writes them", False), ("auto_map", True),
    ("tekken.json", True), ("a WordLevel tokenizer.json", True), ("added tokens of another shape", True)])
def test_transformers_checks_the_tokenizers_it_would_build_otherwise(tiny_model_dir, tmp_path, monkeypatch, case, full):
    """Where transformers does not just load tokenizer.json with the tokenizers library (remote
    code, Mistral's tekken.json, added tokens it parses, a tokenizer model it rebuilds as a BPE
    for qwen2), the check is its own full load."""
    from tokenizers import Tokenizer, models

    from grpo_ray.models import modeling

    folder = _copy(tiny_model_dir, tmp_path / "m", MODEL_FILES + TOKENIZER_FILES)
    config_path = tmp_path / "m" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if case == "added tokens as save_pretrained writes them":
        config["added_tokens_decoder"] = {"0": {"content": "<|endoftext|>", "special": True}}
    elif case == "added tokens of another shape":
        config["added_tokens_decoder"] = {"<|endoftext|>": 0}
    elif case == "auto_map":
        config["auto_map"] = {"AutoTokenizer": ["tok.MyTokenizer", None]}
    elif case == "tekken.json":
        (tmp_path / "m" / "tekken.json").write_text("{}")
    elif case == "a WordLevel tokenizer.json":
        Tokenizer(models.WordLevel(vocab={"What": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
            os.path.join(folder, "tokenizer.json"))
    config_path.write_text(json.dumps(config))
    loaded = []
    monkeypatch.setattr(modeling, "load_tokenizer", lambda path: loaded.append(path))
    modeling.check_model_dir(folder)
    assert loaded == ([folder] if full else [])


def test_a_model_folder_without_weights_is_refused(tiny_model_dir, tmp_path):
    from grpo_ray.models.modeling import ModelDirError, check_model_dir

    folder = _copy(tiny_model_dir, tmp_path / "m", ["config.json", *TOKENIZER_FILES])
    with pytest.raises(ModelDirError, match=r"no weights .*model\.safetensors"):
        check_model_dir(folder)


def test_a_sharded_model_with_a_missing_shard_is_refused(tiny_model_dir, tmp_path):
    from grpo_ray.models.modeling import ModelDirError, check_model_dir

    folder = _copy(tiny_model_dir, tmp_path / "m", ["config.json", *TOKENIZER_FILES])
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copy(os.path.join(tiny_model_dir, "model.safetensors"), tmp_path / "m" / "model-00001-of-00002.safetensors")
    with pytest.raises(ModelDirError, match="model-00002-of-00002.safetensors"):
        check_model_dir(folder)


def test_a_malformed_config_json_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    from grpo_ray.models.modeling import ModelDirError, check_model_dir

    folder = _copy(tiny_model_dir, tmp_path / "m", MODEL_FILES[1:] + TOKENIZER_FILES)
    (tmp_path / "m" / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ModelDirError, match=f"{folder}/config.json is not valid JSON"):
        check_model_dir(folder)


def test_max_model_len_above_the_models_context_is_refused(tiny_model_dir):
    from grpo_ray.models.modeling import ModelDirError, check_model_dir

    with pytest.raises(ModelDirError) as e:
        check_model_dir(tiny_model_dir, max_model_len=4096)
    msg = str(e.value)
    assert "rollout.max_model_len=4096" in msg and "512" in msg and "max_position_embeddings" in msg


def test_the_context_limit_reads_rope_scaling_and_other_names(tmp_path):
    from grpo_ray.models.modeling import model_context_len

    assert model_context_len({"max_position_embeddings": 512}) == 512
    assert model_context_len({"n_positions": 1024}) == 1024  # GPT-2
    assert model_context_len({"max_position_embeddings": 4096,
                              "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 4096}}) == 16384
    assert model_context_len({"text_config": {"max_position_embeddings": 2048}}) == 2048
    assert model_context_len({"vocab_size": 10}) is None  # unknown: no check


def test_the_cli_prints_a_model_folder_error_as_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from grpo_ray import cli
    from grpo_ray.driver import evaluation
    from grpo_ray.models.modeling import check_model_dir

    folder = _copy(tiny_model_dir, tmp_path / "m", MODEL_FILES)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    monkeypatch.setattr(evaluation, "eval_model", lambda cfg, model, records, out: check_model_dir(model))
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", folder, str(data)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("grpo-ray: error: model folder") and err.count("\n") == 1


# --------------------------------------------------------------------------- CLI: user errors vs bugs


def _fake_train(exc):
    def train(cfg, address=None):
        from grpo_ray.driver.outputs import create_run_dir

        create_run_dir(cfg)

        def deep_inside_torch():
            raise exc

        deep_inside_torch()

    return train


def _run_cli(monkeypatch, capsys, tmp_path, exc):
    from grpo_ray import cli
    from grpo_ray.driver import train

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(train, "train", _fake_train(exc))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", f"run.output_dir={tmp_path}", "run.name=r"])
    return e.value.code, capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_goes_to_error_log(tmp_path, monkeypatch, capsys):
    code, err = _run_cli(monkeypatch, capsys, tmp_path, ValueError("expected a tensor of shape [4, 8]"))
    log = tmp_path / "r" / "error.log"
    assert code == 1 and "Traceback" in err and "deep_inside_torch" in err
    assert err.strip().splitlines()[-1] == (
        "grpo-ray: internal error (a bug, not your input): ValueError: expected a tensor of shape [4, 8]; "
        f"the traceback is above and in {log}")
    assert "deep_inside_torch" in log.read_text() and "ValueError: expected a tensor" in log.read_text()
    code, err = _run_cli(monkeypatch, capsys, tmp_path, OSError(5, "Input/output error"))
    assert code == 1 and "Traceback" in err
    text = log.read_text()
    assert text.count("Traceback") == 2 and "Input/output error" in text  # appended
    assert [f for f in os.listdir(tmp_path / "r") if "tmp" in f] == []


@pytest.mark.parametrize("exc, line", [
    ("config", "grpo-ray: error: algo.beta=-1: must be >= 0"),
    ("missing", "grpo-ray: error: [Errno 2] No such file or directory: '/nowhere/train.jsonl'"),
    ("full", "grpo-ray: error: [Errno 28] No space left on device"),
])
def test_the_users_errors_stay_one_line(tmp_path, monkeypatch, capsys, exc, line):
    from grpo_ray.config import ConfigError

    exc = {"config": ConfigError("algo.beta=-1: must be >= 0"),
           "missing": FileNotFoundError(2, "No such file or directory", "/nowhere/train.jsonl"),
           "full": OSError(28, "No space left on device")}[exc]
    code, err = _run_cli(monkeypatch, capsys, tmp_path, exc)
    assert code == 2 and err == line + "\n"
    assert not (tmp_path / "r" / "error.log").exists()


def test_an_error_raised_in_an_actor_is_a_bug():
    from ray.exceptions import RayTaskError

    from grpo_ray.cli import is_user_error
    from grpo_ray.config import ConfigError

    wrapped = RayTaskError("Generator.generate", "Traceback ...", ValueError("bad shape")).as_instanceof_cause()
    assert isinstance(wrapped, ValueError) and not is_user_error(wrapped)
    assert not is_user_error(RayTaskError("f", "tb", FileNotFoundError(2, "x", "/y")).as_instanceof_cause())
    assert is_user_error(ConfigError("x")) and not is_user_error(ValueError("x"))
    assert not is_user_error(KeyError("step")) and not is_user_error(OSError(5, "Input/output error"))


@pytest.fixture
def tiny_disk(tmp_path):
    """An 8 MiB tmpfs (root only): a disk that fills up."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    import gc

    gc.collect()  # a failed torch.save's file handle lives on in its traceback until collected
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_names_the_folder_and_keeps_what_was_saved(tiny_disk):
    """Issue 28 #5: torch's save on a full disk said `[enforce fail at inline_container.cc:672]
    . unexpected pos ...`, naming no file and not saying the disk was full."""
    import torch

    from grpo_ray.driver.checkpoint import DiskFullError, writing

    before = tiny_disk / "checkpoints" / "step_000001"
    before.mkdir(parents=True)
    (before / "state.json").write_text('{"step": 1}')
    final = str(tiny_disk / "checkpoints" / "step_000002")
    with pytest.raises(DiskFullError, match=r"could not write .*step_000002: the disk is full .*nothing saved before "
                                            r"was touched.*--resume") as e:
        with writing(final) as tmp:
            torch.save(torch.zeros(4 << 20), os.path.join(tmp, "weights.pt"))  # 16 MiB on an 8 MiB disk
    assert e.value.errno == 28 and e.value.filename == final
    assert (before / "state.json").read_text() == '{"step": 1}'
    assert sorted(p.name for p in (tiny_disk / "checkpoints").iterdir()) == ["step_000001"]  # no temp folder left
    with pytest.raises(ValueError, match="not a disk problem"):  # any other error passes through as it was
        with writing(final):
            raise ValueError("not a disk problem")
