"""Post-training conversion end to end (spikellm.posttrain.pipeline): ``python train.py
experiment=<conversion> model.hf_path=<dir>`` on tiny random Hugging Face models, and what
eval.py loads afterwards."""
import json

import pytest
import torch
import transformers
from conftest import compose, run_script

from spikellm.config import build
from spikellm.errors import ConfigError
from spikellm.checkpoints.loader import load_model
from spikellm.models.hf import LogitsModel
from spikellm.models.llama import SpikingLlama
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.checkpoints.converted import RECORD, read_record
from spikellm.posttrain.pipeline import run_conversion, validation_ppl
from spikellm.sparsity import gates
from spikellm.training.pipeline import converts
from spikellm.checkpoints.shards import TensorFiles
from spikellm.errors import Interrupted
from spikellm.generation import generate
from spikellm.posttrain import omniquant, sequential
from spikellm.posttrain.omniquant import LearnableClipping
from spikellm.posttrain.state import ConversionState
from spikellm.quant import RoundToNearest, TernaryAbsMean

EXPERIMENTS = ["spikellm_w4a4", "spikellm_ternary", "sdllm_w4", "sparsify", "hf_qat"]
POSITIONS = 128
# tiny sizes: 4 calibration windows of 32 tokens, 2 validation batches for the perplexities
FAST = ["convert.calibration.n_samples=4", "convert.calibration.seq_len=32", "data.block_size=32",
        "data.batch_size=4", "convert.eval_batches=2", "logger=none", "callbacks=none"]
PER_EXPERIMENT = {
    "spikellm_w4a4": ["convert.stages.block.epochs=2"],
    "hf_qat": ["convert.stages.qat.max_steps=3", "trainer.val_check_interval=2", "+trainer.limit_val_batches=2",
               "convert.stages.qat.spike_loss.weight=0.5", "convert.stages.qat.spike_loss.target=0.5"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _configs(vocab: int) -> dict:
    dec = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=POSITIONS)
    return {
        "llama": lambda: transformers.LlamaConfig(**dec),
        "opt": lambda: transformers.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=POSITIONS,
                                              word_embed_proj_dim=32),
        "rwkv": lambda: transformers.RwkvConfig(vocab_size=vocab, hidden_size=32, attention_hidden_size=32,
                                                intermediate_size=64, num_hidden_layers=2, context_length=POSITIONS),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=POSITIONS),
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A local Hugging Face directory (config, random weights, the tokenizer) per architecture."""
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("hf")
    tokenizer = build_tokenizer(load_documents("pydoc")[:200], vocab_size=512)
    dirs = {}
    for arch, config in _configs(tokenizer.vocab_size).items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config())
        dirs[arch] = root / arch
        model.save_pretrained(dirs[arch])
        tokenizer.save(dirs[arch])
    return dirs


def _cfg(experiment: str, hf_dir, output_dir, *extra: str):
    return compose([f"experiment={experiment}", f"model.hf_path={hf_dir}", *FAST,
                    *PER_EXPERIMENT.get(experiment, []), *extra], output_dir)


def _rows_distinct(weight: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in weight.detach())


def _check_saved(cfg, result, arch: str) -> tuple[torch.nn.Module, dict]:
    """The saved directory is complete, eval loads it, and it reproduces the converted perplexity."""
    model_dir = result.model_dir
    assert model_dir == result.output_dir / "spiking_model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", RECORD):
        assert (model_dir / name).is_file(), name
    assert not [p for p in model_dir.parent.iterdir() if p.name.endswith(".partial")]
    record = read_record(model_dir)
    assert record == json.loads((model_dir / RECORD).read_text())
    assert set(record["stages"]) == set(cfg.convert.stages)
    assert record["source"] == str(cfg.model.hf_path)
    assert record["metrics"]["final_ppl"] == pytest.approx(result.final_ppl)

    loaded = load_model(model_dir)
    # a LLaMA loads as our own (shared encodings, our KV cache); other architectures as transformers'
    assert isinstance(loaded.model, SpikingLlama if arch == "llama" else LogitsModel) and not loaded.model.training
    assert loaded.config["hf_model_type"] == arch
    assert loaded.tokenizer.vocab_size == transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    hf_model = loaded.model if arch == "llama" else loaded.model.hf_model
    assert len(_spiking(hf_model)) == 2 * (6 if arch == "opt" else 7)
    # the very model that was measured: same perplexity on the same validation batches
    datamodule = build(cfg.data, "data", tokenizer_path=str(cfg.model.hf_path))
    datamodule.setup("fit")
    assert validation_ppl(hf_model, datamodule, cfg.convert.eval_batches) == pytest.approx(result.final_ppl,
                                                                                           rel=1e-4)
    return hf_model, record


def _spiking(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SpikingLinear)}


QUANTIZERS = (RoundToNearest, TernaryAbsMean, LearnableClipping)


def _decodes_without_quantizing(model_dir, record, monkeypatch):
    """The output stores quantized projections packed, and decoding it never quantizes a
    weight (a quantizer per forward made a 1.1B model 100x slower)."""
    files = TensorFiles(model_dir)
    quantized = [name for name, info in record["layers"].items() if info["weight_format"] != "float"]
    for name in quantized:
        assert f"{name}.qweight" in files and f"{name}.weight" not in files, name
    loaded = load_model(model_dir)
    calls = []
    for cls in QUANTIZERS:
        for method in ("forward", "scales_and_integers"):
            real = getattr(cls, method)
            monkeypatch.setattr(cls, method, lambda self, *a, real=real, **k: calls.append(1) or real(self, *a, **k))
    run = generate(loaded.model, [[3, 4, 5]], max_new_tokens=3)
    assert len(run.tokens[0]) == 3 and calls == []
    monkeypatch.undo()
    return quantized


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_converts_llama(hf_dirs, tmp_path, experiment, monkeypatch):
    cfg = _cfg(experiment, hf_dirs["llama"], tmp_path / "run")
    assert converts(cfg)
    result = run_conversion(cfg)
    for ppl in (result.fp_ppl, result.spiking_ppl, result.final_ppl):
        assert 1 < ppl < 10 * 512  # a random model over a 512-token vocabulary
    model, record = _check_saved(cfg, result, "llama")
    layers = _spiking(model)
    packed = _decodes_without_quantizing(result.model_dir, record, monkeypatch)
    assert len(packed) == (0 if experiment == "sparsify" else 14)
    if experiment == "spikellm_w4a4":
        assert result.stages["obs"]["layers"] == 14
        block = result.stages["block"]
        assert block["blocks"] == 2
        assert all(after <= before for before, after in zip(block["mse_before"], block["mse_after"]))
        # clipping folded: int4 values in the weights themselves, and no grid left to re-apply
        assert record["neuron"]["weight_quantizer"] is None
        for name, layer in layers.items():
            assert layer.weight_quantizer is None and layer.encoder is not None, name
            assert _rows_distinct(layer.weight) <= 15, name
            assert layer.encoder.channel_scale is not None, name  # Optimal Brain Spiking, saved and loaded
    elif experiment == "spikellm_ternary":
        assert result.stages["gptq"]["layers"] == 14
        assert "TernaryGIFGrid" in result.stages["gptq"]["grid"]
        for name, layer in layers.items():
            assert layer.weight_quantizer is None, name
            # {-1, 0, 1}·α on most columns, {-2..2}·s on the salient ones
            assert _rows_distinct(layer.weight) <= 3 + 5, name
    elif experiment == "sdllm_w4":
        assert record["neuron"]["weight_quantizer"] is None
        for name, layer in layers.items():
            assert layer.weight_quantizer is None and layer.encoder is not None, name
            assert _rows_distinct(layer.weight) <= 15, name
    elif experiment == "sparsify":
        _check_sparsified(model, record, result)
    elif experiment == "hf_qat":
        assert result.stages["qat"]["steps"] == 3
        # the spike objective trains beside the distillation loss, and is logged apart from it
        assert result.stages["qat"]["train/spike_loss"] >= 0 and result.stages["qat"]["train/spikes_per_activation"] > 0
        # QAT trains the float weights; the int4 grid is folded into packed integers when saved
        assert record["neuron"]["weight_quantizer"] is None
        assert {info["weight_format"] for info in record["layers"].values()} == {"int4"}
        for name, layer in layers.items():
            assert layer.weight_quantizer is None and layer.packed is not None, name
            assert _rows_distinct(layer.weight) <= 15, name


def _check_sparsified(model, record, result):
    summary = result.stages["sparsify"]
    assert summary["bound_respected"] is True
    assert summary["final_loss"] <= summary["loss_bound"] * summary["dense_loss"] * (1 + 1e-9)
    assert record["thresholds"] and any(value > 0 for value in record["thresholds"].values())
    assert 0 < summary["weighted_sparsity"] < 1
    installed = gates(model)
    # recorded under transformers' names; a LLaMA loaded as our own drops their "model." prefix
    recorded = {(name.removeprefix("model.") if isinstance(model, SpikingLlama) else name): value
                for name, value in record["thresholds"].items()}
    assert set(installed) == set(recorded) == set(_spiking(model))
    for name, value in recorded.items():
        assert float(installed[name].threshold) == pytest.approx(value)
    assert all(layer.encoder is None for layer in _spiking(model).values())  # neuron=none


@pytest.mark.parametrize("arch", ["opt", "rwkv"])
@pytest.mark.parametrize("experiment", ["spikellm_ternary", "sdllm_w4", "sparsify"])
def test_other_architectures_convert(hf_dirs, tmp_path, arch, experiment):
    cfg = _cfg(experiment, hf_dirs[arch], tmp_path / "run")
    result = run_conversion(cfg)
    model, record = _check_saved(cfg, result, arch)
    if experiment == "sparsify":
        _check_sparsified(model, record, result)
    else:
        assert result.stages["gptq"]["layers"] == 2 * (6 if arch == "opt" else 7)
        bound = 8 if experiment == "spikellm_ternary" else 15
        assert all(_rows_distinct(layer.weight) <= bound for layer in _spiking(model).values())


def test_w4a4_exposes_the_let_override(tmp_path):
    """The refusal below names ``convert.stages.block.let``: that override must compose as written."""
    cfg = compose(["experiment=spikellm_w4a4", "convert.stages.block.let=false"], tmp_path / "run")
    assert cfg.convert.stages.block.let is False


def test_w4a4_on_opt_without_smoothing(hf_dirs, tmp_path):
    # ++: works whether or not the experiment lists the key (see test_w4a4_exposes_the_let_override)
    cfg = _cfg("spikellm_w4a4", hf_dirs["opt"], tmp_path / "run", "++convert.stages.block.let=false")
    result = run_conversion(cfg)
    model, record = _check_saved(cfg, result, "opt")
    assert record["neuron"]["weight_quantizer"] is None
    assert all(_rows_distinct(layer.weight) <= 15 for layer in _spiking(model).values())


def test_w4a4_on_opt_with_smoothing_is_refused(hf_dirs, tmp_path):
    cfg = _cfg("spikellm_w4a4", hf_dirs["opt"], tmp_path / "run")
    with pytest.raises(ConfigError) as raised:
        run_conversion(cfg)
    assert raised.value.key == "convert.stages.block.let" and "let=false" in str(raised.value)
    assert not (tmp_path / "run" / "spiking_model").exists()


def test_a_second_run_into_the_same_directory_is_refused(hf_dirs, tmp_path):
    cfg = _cfg("sparsify", hf_dirs["llama"], tmp_path / "run")
    run_conversion(cfg)
    weights = tmp_path / "run" / "spiking_model" / "model.safetensors"
    before = (weights.read_bytes(), (weights.parent / RECORD).read_text())
    with pytest.raises(ConfigError) as raised:
        run_conversion(cfg)
    assert raised.value.key == "paths.output_dir" and "already holds a spiking_model" in str(raised.value)
    assert (weights.read_bytes(), (weights.parent / RECORD).read_text()) == before


def test_missing_or_bad_model_dir(hf_dirs, tmp_path):
    with pytest.raises(ConfigError) as raised:
        run_conversion(_cfg("sdllm_w4", tmp_path / "nowhere", tmp_path / "run"))
    assert raised.value.key == "model.hf_path" and "no such directory" in str(raised.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        run_conversion(_cfg("sdllm_w4", empty, tmp_path / "run"))
    assert not (tmp_path / "run" / "spiking_model").exists()


def test_unsupported_architecture_lists_the_supported_ones(hf_dirs, tmp_path):
    with pytest.raises(ConfigError) as raised:
        run_conversion(_cfg("sdllm_w4", hf_dirs["gpt2"], tmp_path / "run"))
    assert raised.value.key == "model.hf_path", raised.value.key
    assert "(gpt2)" in str(raised.value) and "supported: llama, mistral, opt, qwen2, rwkv" in str(raised.value)


@pytest.mark.parametrize("override, key", [
    (f"convert.calibration.seq_len={POSITIONS + 1}", "convert.calibration.seq_len"),
    (f"data.block_size={POSITIONS + 1}", "data.block_size"),
    ("convert.calibration.seq_len=1", "convert.calibration.seq_len"),  # a window needs 2 tokens
    ("convert.calibration.n_samples=0", "convert.calibration.n_samples"),
])
def test_calibration_settings_name_their_key(hf_dirs, tmp_path, override, key):
    cfg = _cfg("sdllm_w4", hf_dirs["llama"], tmp_path / "run", override)
    with pytest.raises(ConfigError) as raised:
        run_conversion(cfg)
    assert raised.value.key == key, str(raised.value)
    if str(POSITIONS + 1) in override:
        assert f"{POSITIONS} positions" in str(raised.value)
    assert not (tmp_path / "run" / "spiking_model").exists()


def test_bad_stage_option_fails_before_any_work(hf_dirs, tmp_path):
    cfg = _cfg("spikellm_w4a4", hf_dirs["llama"], tmp_path / "run", "convert.stages.block.epochs=-1")
    with pytest.raises(ConfigError) as raised:
        run_conversion(cfg)
    assert raised.value.key == "convert.stages.block.epochs"
    assert not (tmp_path / "run").exists()


def test_stages_with_the_native_model_are_refused(tmp_path):
    cfg = compose(["+convert.stages.gptq._target_=spikellm.posttrain.GPTQ"], tmp_path / "run")
    with pytest.raises(ConfigError) as raised:
        converts(cfg)
    assert raised.value.key == "model" and "model=hf" in str(raised.value)
    assert converts(compose([], tmp_path / "run")) is False


def test_train_py_without_a_model_dir(tmp_path):
    done = run_script("train.py", "experiment=sdllm_w4", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: model.hf_path="), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def _tensors(directory) -> dict:
    files = TensorFiles(directory)
    return {name: files.get(name) for name in files.names()}


@pytest.mark.parametrize("experiment, stage", [("sdllm_w4", "gptq"), ("spikellm_w4a4", "block")])
def test_an_interrupted_conversion_resumes_at_the_next_block(hf_dirs, tmp_path, monkeypatch, experiment, stage):
    """Ctrl-C after block 0 of a block-by-block stage keeps it; the same command goes on at block 1
    and writes the very model an uninterrupted conversion writes."""
    cfg = _cfg(experiment, hf_dirs["llama"], tmp_path / "run")
    real_save = ConversionState.save_block

    def interrupted(self, name, index, *args):
        real_save(self, name, index, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(ConversionState, "save_block", interrupted)
    with pytest.raises(Interrupted) as raised:
        run_conversion(cfg)
    message = str(raised.value)
    assert f"stage {stage}: 1 blocks finished" in message and f"hydra.run.dir={tmp_path / 'run'}" in message
    assert not (tmp_path / "run" / "spiking_model").exists()
    monkeypatch.setattr(ConversionState, "save_block", real_save)
    ran = []
    for module, name in ((sequential, "gptq_block"), (omniquant, "calibrate_block")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda block, inputs_or_index, *a, real=real, **k: ran.append(1) or real(
            block, inputs_or_index, *a, **k))
    resumed = run_conversion(cfg)
    assert len(ran) == 1  # block 1 only
    assert not (tmp_path / "run" / "conversion_state").exists()
    fresh = run_conversion(_cfg(experiment, hf_dirs["llama"], tmp_path / "fresh"))
    assert resumed.final_ppl == fresh.final_ppl
    mine, theirs = _tensors(resumed.model_dir), _tensors(fresh.model_dir)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_kept_state_of_another_configuration_is_refused(hf_dirs, tmp_path, monkeypatch):
    cfg = _cfg("sdllm_w4", hf_dirs["llama"], tmp_path / "run")
    monkeypatch.setattr(ConversionState, "save_block", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(Interrupted):
        run_conversion(cfg)
    monkeypatch.undo()
    other = _cfg("sdllm_w4", hf_dirs["llama"], tmp_path / "run", "neuron.weight_quantizer.bits=3")
    with pytest.raises(ConfigError) as raised:
        run_conversion(other)
    assert raised.value.key == "convert.resume" and "convert.resume=false" in str(raised.value)
    fresh = run_conversion(_cfg("sdllm_w4", hf_dirs["llama"], tmp_path / "run", "neuron.weight_quantizer.bits=3",
                                "convert.resume=false"))
    assert fresh.model_dir.is_dir() and fresh.stages["gptq"]["layers"] == 14


def test_gptq_shares_one_hessian_per_input(hf_dirs, tmp_path):
    """q/k/v read one tensor and gate/up another: 4 Hessians per LLaMA block, not 7."""
    result = run_conversion(_cfg("sdllm_w4", hf_dirs["llama"], tmp_path / "run"))
    assert result.stages["gptq"]["hessians_per_block"] == 4
    assert result.stages["gptq"]["time_over_forward"] > 1
