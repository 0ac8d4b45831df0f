"""Every model directory spikellm writes is also a ``transformers`` model.

For a checkpoint of each kind (the native LLaMA under every neuron group of conf/neuron, spiking
attention among them; the MatMul-free LM; converted LLaMA and OPT models):

- ``AutoConfig`` / ``AutoModelForCausalLM`` load it, registered by ``import spikellm`` and through
  ``trust_remote_code=True``, with the logits and spikes per activation of ``load_model``;
- ``generate`` (transformers' loop, the model's cache) gives spikellm's greedy tokens, padded too;
- ``save_pretrained`` → ``from_pretrained`` gives back the very tensors and files;
- the energy counter and ``generation_energy`` give the same figures through either door;
- lm-eval's ``hf`` model scores the bundled tasks as the spikellm adapter does;
- without spikellm installed, the remote-code path says in one line what to install.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

import spikellm  # noqa: F401  (registers the Auto classes)
from conftest import ROOT
from spikellm.checkpoints.converted import save_converted
from spikellm.checkpoints.hub import SpikellmForCausalLM
from spikellm.checkpoints.loader import load_model
from spikellm.checkpoints.spiking import save_spiking_checkpoint
from spikellm.config import build_model
from spikellm.errors import ConfigError, DataError
from spikellm.evaluation.harness import neuron_config
from spikellm.generation import generate, generation_energy
from spikellm.models.spikify import spikify_from_config

pytestmark = pytest.mark.usefixtures("one_thread")

NEURONS = sorted(p.stem for p in (ROOT / "conf" / "neuron").glob("*.yaml"))
LLAMA = {"_target_": "spikellm.models.LlamaConfig", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "ffn_dim": 48, "max_seq_len": 64}
MATMULFREE = {"_target_": "spikellm.models.MatMulFreeConfig", "dim": 32, "n_layers": 2, "ffn_dim": 48,
              "max_seq_len": 64}
CONVERTED = ("llama", "opt")
KINDS = [f"llama-{name}" for name in NEURONS] + ["matmulfree-bitnet"] + [f"converted-{a}" for a in CONVERTED]
CARD = {"perplexity": 41.5, "corpus": "pydoc", "spikes per activation": 0.93, "energy per token (J)": 2.0e-6,
        "dense energy per token (J)": 9.0e-6, "energy vs dense": 0.22, "command": "python train.py experiment=x"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    return build_tokenizer(load_documents("pydoc")[:40], vocab_size=320, cache_dir=tmp_path_factory.mktemp("bpe"))


def _perturbed(model, seed: int):
    """Weights off their initial values, norms with a few large channels: nothing equal by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
            if name.endswith("norm.weight"):
                param.mul_(1 + 3 * (torch.arange(param.numel()) % 7 == 0))
    return model.eval()


def _write(kind: str, directory: Path, tokenizer) -> Path:
    family, _, variant = kind.partition("-")
    if family == "converted":
        hf_configs = {"llama": lambda: transformers.LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
            "opt": lambda: transformers.OPTConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32)}
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_configs[variant]())
        neuron = neuron_config("gif")
        spikify_from_config(model, neuron)
        _perturbed(model, 1)
        record = {"neuron": neuron, "thresholds": {}, "stages": {"obs": {}}, "source": "org/tiny-base",
                  "metrics": {"final_ppl": 50.5, "fp_ppl": 40.1, "energy_per_token_after_J": 1e-6,
                              "dense_energy_per_token_J": 4e-6,
                              "spikes_per_activation": 0.8}}
        return save_converted(model, tokenizer, directory, record)
    neuron = neuron_config(variant)
    config = dict(LLAMA if family == "llama" else MATMULFREE, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = _perturbed(build_model(config, neuron), 1)
    return save_spiking_checkpoint(model, directory, model_config=config, neuron=neuron, tokenizer=tokenizer,
                                   card=CARD, cost_model="horowitz45_fp32")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("kinds")
    return {kind: _write(kind, root / kind, tokenizer) for kind in KINDS}


def _ids(tokenizer, batch=2, seq=10, seed=3):
    return torch.randint(1, tokenizer.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _spikes(model, run) -> float | None:
    from spikellm.energy import OperationCounter, load_cost_model

    counter = OperationCounter(model)
    try:
        with torch.no_grad():
            run()
        report = counter.report(load_cost_model("horowitz45_fp32"))
    finally:
        counter.remove()
    return report.spikes_per_activation


# ---- Auto classes: the registered and the remote-code paths -------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_auto_classes_give_spikellm_logits_and_spikes(checkpoints, tokenizer, kind):
    directory = checkpoints[kind]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "spikellm" and config["architectures"] == ["SpikellmForCausalLM"]
    assert config["torch_dtype"] == "float32" and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (directory / "modeling_spikellm.py").is_file() and (directory / "generation_config.json").is_file()

    reference = load_model(directory)
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = reference.model(ids)
    assert isinstance(transformers.AutoConfig.from_pretrained(directory), spikellm.checkpoints.hub.SpikellmConfig)
    for remote in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote)
        assert type(model).__name__ == "SpikellmForCausalLM" and not model.training
        with torch.no_grad():
            logits = model(ids).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    if any(True for _ in reference.model.modules() if getattr(_, "encoder", None) is not None):
        assert _spikes(model, lambda: model(ids)) == _spikes(reference.model, lambda: reference.model(ids))


def test_remote_code_loads_without_importing_spikellm(checkpoints):
    """A fresh interpreter that never imports spikellm: the directory's modeling file does."""
    script = (f"import sys, torch, transformers\n"
              f"model = transformers.AutoModelForCausalLM.from_pretrained({str(checkpoints['llama-ternary'])!r}, "
              f"trust_remote_code=True)\n"
              f"print(type(model).__name__, model(torch.tensor([[5, 6, 7]])).logits.shape[-1])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["SpikellmForCausalLM", str(json.loads(
        (checkpoints["llama-ternary"] / "config.json").read_text())["vocab_size"])]


LAZY = """
import sys, time
began = time.perf_counter()
import spikellm
assert "transformers" not in sys.modules, "import spikellm imported transformers"
light = time.perf_counter() - began
from transformers import AutoConfig
config = AutoConfig.from_pretrained(sys.argv[1])
assert type(config).__name__ == "SpikellmConfig", type(config)
assert "transformers.modeling_utils" not in sys.modules, "the config alone loaded transformers' models"
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__, light < 1.0)
"""


def test_import_spikellm_registers_lazily(checkpoints):
    """``import spikellm`` imports nothing of transformers; the config registers when AutoConfig
    loads (without transformers' modeling code), the model when AutoModelForCausalLM does."""
    done = subprocess.run([sys.executable, "-c", LAZY, str(checkpoints["llama-ternary"])], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["SpikellmForCausalLM", "True"]


HIDE = """
import importlib.abc, sys
class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "spikellm":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hidden())
import transformers
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
"""


def test_without_spikellm_installed_one_line_names_the_package(checkpoints):
    done = subprocess.run([sys.executable, "-c", HIDE, str(checkpoints["llama-ternary"])], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "spikellm" in last and "pip install spikellm" in last, last


# ---- generation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-ternary", "llama-ternary_attention", "llama-gif_obs", "matmulfree-bitnet",
                                  "converted-llama", "converted-opt"])
def test_transformers_generate_gives_spikellm_greedy_tokens(checkpoints, tokenizer, kind):
    directory = checkpoints[kind]
    reference = load_model(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23]]  # the second left-padded
    ids = torch.tensor([prompts[0], [0, 0, 0, *prompts[1]]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    steps = 12
    for rows, row_mask in ((ids[:1], mask[:1]), (ids, mask)):
        ours = generate(reference.model, rows, attention_mask=row_mask, max_new_tokens=steps)
        with torch.no_grad():
            theirs = model.generate(rows, attention_mask=row_mask, max_new_tokens=steps, min_new_tokens=steps,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        assert theirs[:, rows.shape[1]:].tolist() == ours.tokens


def test_pipeline_text_generation(checkpoints):
    directory = checkpoints["llama-ternary"]
    generator = transformers.pipeline("text-generation", model=str(directory))
    out = generator("The built-in function", max_new_tokens=6, do_sample=False)
    reference = load_model(directory)
    prompt = reference.tokenizer.encode("The built-in function")
    expected = generate(reference.model, prompt, max_new_tokens=6, eos_token_id=reference.tokenizer.eos_id)
    assert out[0]["generated_text"] == "The built-in function" + reference.tokenizer.decode(expected.tokens[0])


# ---- files -------------------------------------------------------------------------------------------
def _tensors(directory: Path) -> dict:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("kind", ["llama-ternary", "llama-ternary_attention", "matmulfree-bitnet",
                                  "converted-llama", "converted-opt"])
def test_save_pretrained_round_trips_bit_identically(checkpoints, tokenizer, kind, tmp_path):
    directory = checkpoints[kind]
    model = SpikellmForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "again")
    again = tmp_path / "again"
    before, after = _tensors(directory), _tensors(again)
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    for name in ("config.json", "spikellm.json", "README.md", "tokenizer.json", "modeling_spikellm.py"):
        if (directory / name).exists():
            assert json.loads((again / name).read_text()) == json.loads((directory / name).read_text()) \
                if name.endswith(".json") else (again / name).read_text() == (directory / name).read_text().replace(
                    directory.name, "again"), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(again)
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_earlier_formats_load_through_the_model_class():
    """The fixtures written by earlier spikellm (no transformers fields) load with from_pretrained."""
    fixtures = ROOT / "tests" / "fixtures" / "formats"
    ids = torch.tensor([[3, 4, 5, 6]])
    for name in ("spiking", "converted", "lightning"):
        path = fixtures / name / ("last.ckpt" if name == "lightning" else "")
        model = SpikellmForCausalLM.from_pretrained(path)
        assert model.config.model_type == "spikellm" and model.config.vocab_size > 6
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, load_model(path).model(ids), rtol=0, atol=0)


def test_model_card_is_what_the_hub_reads(checkpoints):
    card = (checkpoints["llama-ternary"] / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "spikellm" and meta["pipeline_tag"] == "text-generation"
    assert "spiking-neural-network" in meta["tags"] and meta["datasets"] == ["pydoc"]
    assert "| perplexity | 41.5 | validation split on pydoc |" in body
    assert "| spikes per activation | 0.9300 |" in body
    assert "2 µJ" in body and "dense 9 µJ" in body and "horowitz45_fp32" in body
    assert "python train.py experiment=x" in body and "AutoModelForCausalLM.from_pretrained" in body
    converted = yaml.safe_load((checkpoints["converted-llama"] / "README.md").read_text().split("---\n")[1])
    assert converted["base_model"] == "org/tiny-base"


# ---- energy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-ternary_attention", "matmulfree-bitnet"])
def test_energy_is_the_same_through_transformers(checkpoints, tokenizer, kind):
    directory = checkpoints[kind]
    reference = load_model(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    ids = _ids(tokenizer, batch=1)
    ours = generation_energy(reference.model, ids, max_new_tokens=5).summary()
    theirs = generation_energy(model, ids, max_new_tokens=5).summary()
    assert theirs == ours


# ---- lm-eval -----------------------------------------------------------------------------------------
TASKS = ["tiny_mc", "tiny_ppl"]


def _scores(summary: dict) -> dict:
    return {(task, metric): round(value, 4) for task, metrics in summary.items() for metric, value in metrics.items()
            if "stderr" not in metric}


def test_lm_eval_hf_model_scores_as_the_spikellm_adapter(checkpoints):
    """lm-eval's own ``hf`` model (HFLM: AutoConfig, AutoModelForCausalLM, AutoTokenizer) against
    spikellm's adapter, on the bundled multiple-choice and perplexity tasks."""
    from lm_eval.models.huggingface import HFLM

    from spikellm.evaluation.harness import SpikeLLMEvalLM
    from spikellm.evaluation.tasks import run_tasks

    directory = str(checkpoints["llama-ternary_attention"])
    include = str(ROOT / "examples" / "lm_eval_tasks")
    ours = run_tasks(SpikeLLMEvalLM(ckpt=directory, batch_size=4), TASKS, include_path=include)
    theirs = run_tasks(HFLM(pretrained=directory, batch_size=4, device="cpu"), TASKS, include_path=include)
    assert _scores(theirs) == _scores(ours)
    assert {metric for _, metric in _scores(ours)} >= {"acc", "acc_norm", "word_perplexity", "bits_per_byte"}


@pytest.mark.slow
def test_lm_eval_cli_with_trust_remote_code(checkpoints):
    directory = checkpoints["llama-ternary"]
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={directory},trust_remote_code=True", "--tasks", "tiny_mc", "--include_path",
                           "examples/lm_eval_tasks", "--device", "cpu", "--batch_size", "4"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_mc" in done.stdout and "acc" in done.stdout


# ---- bad inputs --------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line(checkpoints, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such directory, and not a Hub repository id"):
        SpikellmForCausalLM.from_pretrained(str(tmp_path / "nothing" / "here" / "at-all"))
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):  # what the hub client raises offline; nothing here reaches a hub
        raise LocalEntryNotFoundError("cannot reach the Hub (offline)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match="'someone/missing-model' cannot be downloaded \\(LocalEntryNotFoundError: "
                                        "cannot reach the Hub.*local directory"):
        SpikellmForCausalLM.from_pretrained("someone/missing-model")
    with pytest.raises(ConfigError, match="already quantized"):
        SpikellmForCausalLM.from_pretrained(checkpoints["llama-ternary"], quantization_config={"bits": 4})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device_map='cuda' is invalid: CUDA is not available"):
            SpikellmForCausalLM.from_pretrained(checkpoints["llama-ternary"], device_map="cuda")
    model = SpikellmForCausalLM.from_pretrained(checkpoints["llama-ternary"])
    with pytest.raises(ConfigError, match="drop state_dict"):
        model.save_pretrained(tmp_path / "out", state_dict={})
    with pytest.raises(ConfigError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "out", max_shard_size="big")
    assert not (tmp_path / "out").exists()
