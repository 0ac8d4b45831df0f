"""Generate.py continues a prompt (streamed) or a file of prompts (JSONL) with any model
file, ends with tokens/s and energy per generated token, and refuses bad input in one line."""
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, CONF, run_script
from spikellm.errors import ConfigError, DataError
from spikellm.evaluation.generating import read_prompts, run_generation

FIXTURES = ROOT / "tests" / "fixtures" / "formats"
CKPT = FIXTURES / "lightning" / "last.ckpt"

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=[f"ckpt={CKPT}", "max_new_tokens=6", f"paths.output_dir={tmp_path}",
                                              *overrides])


def test_one_prompt_streams_its_continuation(tmp_path, capsys):
    run = run_generation(config(tmp_path, "prompt='def main('", "temperature=0"), out=sys.stdout)
    printed = capsys.readouterr().out
    assert printed.startswith("def main(") and printed.endswith("\n")
    assert run.records[0]["new_tokens"] == 6 and run.output is None
    energy = run.energy
    assert energy["generated_tokens"] == 6 and energy["uj_per_token"] > 0 and energy["dense_uj_per_token"] > 0
    assert 0 < energy["spikes_per_activation"] < 8 and "Horowitz" in energy["cost_model"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_file_of_prompts_is_a_batch_written_as_jsonl(tmp_path, suffix):
    prompts = ["import os", "class A:", "x = [1, 2"]
    path = tmp_path / f"prompts{suffix}"
    path.write_text("\n".join(json.dumps({"prompt": p}) if suffix == ".jsonl" else p for p in prompts) + "\n\n")
    run = run_generation(config(tmp_path, f"prompts={path}", "batch_size=2", "temperature=0"))
    lines = [json.loads(line) for line in Path(run.output).read_text().splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    assert all(line["new_tokens"] == 6 and line["stop_reason"] == "length" for line in lines)
    # greedy: the batch gives what each prompt gives alone
    alone = run_generation(config(tmp_path / "alone", "prompt='class A:'", "temperature=0"), out=open("/dev/null", "w"))
    assert alone.records[0]["completion"] == lines[1]["completion"]


def test_stop_strings_cut_the_continuation(tmp_path):
    free = run_generation(config(tmp_path, "prompt='import os'", "temperature=0", "max_new_tokens=12"),
                          out=open("/dev/null", "w")).records[0]["completion"]
    stop = free[3:5]
    cut = run_generation(config(tmp_path / "cut", "prompt='import os'", "temperature=0", "max_new_tokens=12",
                                f"stop=[{json.dumps(stop)}]"), out=open("/dev/null", "w")).records[0]
    assert cut["completion"] == free[:free.index(stop)] and cut["stop_reason"] == "stop"


@pytest.mark.parametrize("overrides,error,match", [
    (["prompt=''"], ConfigError, "is empty"),
    ([], ConfigError, "give one of prompt"),
    (["prompt=x", "prompts=/nonexistent.txt"], ConfigError, "give one of prompt"),
    (["prompt=x", "top_p=1.5"], ConfigError, r"top_p=1.5 .*\(0, 1\]"),
    (["prompt=x", "temperature=-1"], ConfigError, "temperature"),
    (["prompt='" + "word " * 200 + "'"], ConfigError, "longer than the model's context"),
    (["prompts=/nonexistent.txt"], ConfigError, "no such file"),
    # text where a number goes, 0 and fractions, a device this machine lacks
    (["prompt=x", "max_new_tokens=abc"], ConfigError, "max_new_tokens='abc'.*integer >= 1"),
    (["prompt=x", "max_new_tokens=2.5"], ConfigError, "max_new_tokens=2.5.*integer"),
    (["prompt=x", "seed=abc"], ConfigError, "seed='abc'.*integer >= 0"),
    (["prompt=x", "top_k=abc"], ConfigError, "top_k='abc'"),
    (["prompt=x", "temperature=abc"], ConfigError, "temperature='abc'"),
    (["prompt=x", "repetition_penalty=abc"], ConfigError, "repetition_penalty='abc'"),
    (["prompt=x", "batch_size=0"], ConfigError, "batch_size=0.*integer >= 1"),
    (["prompt=x", "batch_size=abc"], ConfigError, "batch_size='abc'"),
    (["prompt=x", "device=cuda"], ConfigError, "device='cuda'.*CUDA is not available"),
    (["prompt=x", "device=gpu0"], ConfigError, "device='gpu0'.*not a device"),
])
def test_bad_input_is_one_line(tmp_path, overrides, error, match, monkeypatch):
    import spikellm.checkpoints.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("a setting was checked after loading"))
    if "longer than" in match:
        monkeypatch.undo()
    with pytest.raises(error, match=match):
        run_generation(config(tmp_path, *overrides), out=open("/dev/null", "w"))


def test_a_plain_stop_string_is_one_stop_not_its_characters(tmp_path):
    free = run_generation(config(tmp_path, "prompt='import os'", "temperature=0", "max_new_tokens=12"),
                          out=open("/dev/null", "w")).records[0]["completion"]
    stop = free[3:5].strip() or free[3:5]
    assert len(stop) >= 1
    cut = run_generation(config(tmp_path / "cut", "prompt='import os'", "temperature=0", "max_new_tokens=12",
                                f"stop={json.dumps(stop)}"), out=open("/dev/null", "w")).records[0]
    assert cut["completion"] == free[:free.index(stop)]


def test_outputs_and_inputs_are_never_overwritten(tmp_path):
    """A second run replaced generations.jsonl; output= the prompts file overwrote the
    prompts; output= a directory failed after all the generation ran. All refused before loading."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\nclass A:\n")
    first = run_generation(config(tmp_path / "run", f"prompts={prompts}", "temperature=0"))
    saved = Path(first.output).read_text()
    for output, match in [(first.output, "already holds generations"), (prompts, "is the prompts file"),
                          (tmp_path, "is a directory")]:
        with pytest.raises(ConfigError, match=match):
            run_generation(config(tmp_path / "run", f"prompts={prompts}", f"output={output}"))
    assert Path(first.output).read_text() == saved and prompts.read_text() == "import os\nclass A:\n"


def test_a_long_prompt_in_a_file_is_named_by_its_line_before_any_is_generated(tmp_path, monkeypatch):
    import spikellm.generation as generation

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass A:\n" + "word " * 200 + "\n")
    monkeypatch.setattr(generation, "generation_energy", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(ConfigError, match=rf"prompts={prompts}:4='.* tokens' .*longer than the model's context"):
        run_generation(config(tmp_path, f"prompts={prompts}"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "x"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match=rf"prompts={blank}:2 has an empty prompt"):
        run_generation(config(tmp_path, f"prompts={blank}"))


def test_a_file_that_is_no_language_model_is_one_line(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a model")
    cfg = config(tmp_path, "prompt=x")
    cfg.ckpt = str(tmp_path / "notes.ckpt")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        run_generation(cfg)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.jsonl")


def test_the_command_prints_speed_and_energy(tmp_path):
    done = run_script("generate.py", f"ckpt={CKPT}", "prompt='def f('", "max_new_tokens=4", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("def f(")
    assert "tokens/s" in done.stderr and "µJ per generated token" in done.stderr and "spikes per" in done.stderr
    bad = run_script("generate.py", f"ckpt={CKPT}", "prompt=x", "top_p=0", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "top_p" in bad.stderr


def test_ctrl_c_keeps_the_prompts_already_generated(tmp_path, monkeypatch):
    """Ctrl-C during a file of prompts writes the finished ones and says so in one line."""
    import spikellm.generation
    from spikellm.errors import Interrupted

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\nclass A:\nx = 1\n")
    real, calls = spikellm.generation.generation_energy, []

    def interrupted_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("spikellm.generation.generation_energy", interrupted_second_batch)
    with pytest.raises(Interrupted) as raised:
        run_generation(config(tmp_path, f"prompts={prompts}", "batch_size=1"))
    output = tmp_path / "generations.jsonl"
    assert f"1 of 3 prompts were generated and are written to {output}" in str(raised.value)
    assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == ["import os"]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_eval_refuses_a_second_run_into_one_directory_and_a_missing_device(tmp_path, monkeypatch, device):
    """A second eval.py into a run directory replaced results.json and energy.png;
    device=cuda on a CPU machine ended in an AssertionError. Both refused before loading."""
    import spikellm.checkpoints.loader as loader
    from spikellm.evaluation.pipeline import run_evaluation

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("refused only after loading"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt={CKPT}", f"paths.output_dir={tmp_path}"])
    (tmp_path / "results.json").write_text('{"earlier": true}')
    with pytest.raises(ConfigError, match="results=.* already exists .*nothing is overwritten"):
        run_evaluation(cfg)
    assert (tmp_path / "results.json").read_text() == '{"earlier": true}'
    cfg.device = device
    with pytest.raises(ConfigError, match=f"device='{device}'.*CUDA is not available"):
        run_evaluation(cfg)


@pytest.mark.parametrize("overrides,match", [
    (["limit=-1"], r"^limit=-1 is invalid: must be an integer >= 1"),
    (["num_fewshot=abc"], r"^num_fewshot='abc' is invalid: must be an integer >= 0"),
    (["batch_size=0"], r"^batch_size=0 is invalid"),
    (["perplexity.batch_size=abc"], r"^perplexity\.batch_size='abc' is invalid"),
    (["perplexity.stride=0"], r"^perplexity\.stride=0 is invalid"),
    (["perplexity.datasets=[/no/such/corpus.txt]"], r"^perplexity\.datasets='/no/such/corpus.txt' is invalid: is no "
                                                    r"corpus name"),
    (["export={tmp}"], r"^export='.*' is invalid: already exists"),
    (["export_hf={tmp}/new/results.json", "results={tmp}/new/results.json"], r"^export_hf=.* is where results="),
    (["results={tmp}"], r"^results=.* is a directory"),
])
def test_eval_settings_and_outputs_are_checked_before_loading(tmp_path, monkeypatch, overrides, match):
    """These were refused after the model loaded and the evaluation ran (export=), named
    without their group (perplexity.*), or ended in tracebacks (limit=-1, num_fewshot=abc)."""
    import spikellm.checkpoints.loader as loader
    from spikellm.evaluation.pipeline import run_evaluation

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("checked only after loading"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt={CKPT}", f"paths.output_dir={tmp_path / 'run'}",
                                         *(o.format(tmp=tmp_path) for o in overrides)])
    with pytest.raises(ConfigError, match=match):
        run_evaluation(cfg)


def test_a_stop_that_is_a_number_is_one_stop_string():
    from spikellm.evaluation.generating import stop_strings

    assert stop_strings(5) == ["5"] and stop_strings("oz") == ["oz"] and stop_strings(["o", "z"]) == ["o", "z"]
    assert stop_strings(None) == []
