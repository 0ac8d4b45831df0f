"""Generation (spikellm.generation): cached decoding equals a full recomputation for every model
type, batches of left-padded prompts equal each prompt alone, bad settings are one line, and the
operation counter counts cached decoding as it counts one forward over the sequence."""
import pytest
import torch
import transformers
from omegaconf import OmegaConf

from spikellm.config import build_attention_encoder, build_neuron
from spikellm.errors import ConfigError
from spikellm.generation import generate, generation_energy
from spikellm.models.llama import LlamaConfig, SpikingLlama
from spikellm.models.matmulfree import MatMulFreeConfig
from spikellm.models.spikify import spikify

from conftest import CONF

VOCAB = 61
NEURONS = sorted(path.stem for path in (CONF / "neuron").glob("*.yaml"))


def neuron_group(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "neuron" / f"{name}.yaml"))


def tiny_llama(neuron: str = "none", seed: int = 0) -> SpikingLlama:
    group = neuron_group(neuron)
    if "defaults" in group:  # ternary_attention and gif_obs extend another group
        base = next(d for d in group.pop("defaults") if d != "_self_")
        group = {**neuron_group(base), **group}
    encoder, quantizer = build_neuron(group)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40)
    return cfg.build(encoder, quantizer, attention_encoder=build_attention_encoder(group)).eval()


def tiny_matmulfree(neuron: str = "bitnet"):
    encoder, quantizer = build_neuron(neuron_group(neuron))
    torch.manual_seed(0)
    return MatMulFreeConfig(vocab_size=VOCAB, dim=32, n_layers=2, max_seq_len=64).build(encoder, quantizer).eval()


def tiny_hf_llama(neuron: str | None = "ternary"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    model = transformers.LlamaForCausalLM(config).eval()
    if neuron is not None:
        spikify(model, build_neuron(neuron_group(neuron))[0])
    return model


def logits_of(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def check_cached_equals_full(model, steps: int = 8):
    """Logits of every cached step against a forward over the whole sequence so far."""
    ids = prompt(7)
    seen = []
    result = generate(model, ids, max_new_tokens=steps, streamer=lambda new: seen.append(new[0]))
    sequence = torch.cat([ids, torch.tensor([result.tokens[0]])], dim=1)
    # replay the cached path step by step, comparing logits
    from spikellm.generation import _runner

    runner = _runner(model, use_cache=True)
    with torch.inference_mode():
        cached = runner.prefill(ids, None)
        for step in range(steps):
            full = logits_of(model, sequence[:, :7 + step])[:, -1]
            assert (cached - full).abs().max().item() <= 1e-5, f"step {step}"
            cached = runner.step(sequence[:, 7 + step], None)
    uncached = generate(model, ids, max_new_tokens=steps, use_cache=False)
    assert result.tokens == uncached.tokens and seen == result.tokens[0]
    assert result.stop_reasons == ["length"]


@pytest.mark.parametrize("neuron", NEURONS)
def test_llama_cache_equals_recomputation(neuron, one_thread):
    check_cached_equals_full(tiny_llama(neuron))


@pytest.mark.parametrize("neuron", ["none", "bitnet", "ternary"])
def test_matmulfree_state_equals_recomputation(neuron, one_thread):
    check_cached_equals_full(tiny_matmulfree(neuron))


@pytest.mark.parametrize("neuron", [None, "ternary"])
def test_hf_cache_equals_recomputation(neuron, one_thread):
    check_cached_equals_full(tiny_hf_llama(neuron))


BATCH_MODELS = {
    "llama": lambda: tiny_llama("none"),
    "llama_ternary_attention": lambda: tiny_llama("ternary_attention"),
    "llama_gif": lambda: tiny_llama("gif"),
    "matmulfree": lambda: tiny_matmulfree("bitnet"),
    "hf_ternary": lambda: tiny_hf_llama("ternary"),
}


@pytest.mark.parametrize("name", sorted(BATCH_MODELS))
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(name, use_cache, one_thread):
    model = BATCH_MODELS[name]()
    prompts = [prompt(n, seed=n).tolist()[0] for n in (3, 9, 6)]
    batched = generate(model, prompts, max_new_tokens=6, use_cache=use_cache)
    alone = [generate(model, p, max_new_tokens=6, use_cache=use_cache).tokens[0] for p in prompts]
    assert batched.tokens == alone
    assert batched.prompt_lengths == [3, 9, 6]


def test_padded_logits_equal_unpadded(one_thread):
    """Left padding changes nothing in the real positions' logits (spiking attention included)."""
    model = tiny_llama("ternary_attention")
    ids = prompt(6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 6])
    with torch.inference_mode():
        assert (model(padded, attention_mask=mask)[:, 3:] - model(ids)).abs().max() <= 1e-5


def test_dense_export_generates_the_same_tokens_in_transformers(one_thread):
    from spikellm.checkpoints.hf import to_hf_llama

    model = tiny_llama("none")
    hf_model = to_hf_llama(model)
    ids = prompt(5)
    ours = generate(model, ids, max_new_tokens=10).tokens[0]
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    assert theirs[0, 5:].tolist() == ours
    assert generate(hf_model, ids, max_new_tokens=10).tokens[0] == ours


def test_stops_and_sampling(one_thread):
    model = tiny_llama("none")
    ids = prompt(4)
    free = generate(model, ids, max_new_tokens=8).tokens[0]
    assert generate(model, ids, max_new_tokens=8, eos_token_id=free[2]).tokens[0] == free[:free.index(free[2]) + 1]
    cut = generate(model, ids, max_new_tokens=8, stop=[free[1:3]])
    end = next(n for n in range(2, 9) if free[n - 2:n] == free[1:3])  # the stop sequence's first end
    assert cut.tokens[0] == free[:end] and cut.stop_reasons == ["stop"]
    called = generate(model, ids, max_new_tokens=8, stop=lambda tokens: len(tokens) == 5)
    assert called.tokens[0] == free[:5] and called.stop_reasons == ["stop"]
    # the context: 40 positions, a prompt of 38 leaves 3 tokens
    assert generate(model, prompt(38), max_new_tokens=8).stop_reasons == ["context"]
    a = generate(model, ids, max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.9, seed=3).tokens
    b = generate(model, ids, max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.9, seed=3).tokens
    assert a == b and all(0 <= t < VOCAB for t in a[0])
    # top_k = 1 is greedy whatever the temperature; a strong repetition penalty repeats nothing
    assert generate(model, ids, max_new_tokens=8, temperature=2.0, top_k=1, seed=0).tokens[0] == free
    fresh = generate(model, ids, max_new_tokens=8, repetition_penalty=1e6).tokens[0]
    assert len(set(fresh)) == len(fresh) and not set(fresh) & set(ids[0].tolist())


@pytest.mark.parametrize("options, message", [
    ({"input_ids": []}, "input_ids='prompt 0: no tokens' is invalid: a prompt must hold at least one token"),
    ({"input_ids": [[1, 2], []]}, "input_ids='prompt 1: no tokens' is invalid"),
    ({"input_ids": list(range(41))},
     "input_ids='41 tokens' is invalid: the prompt is longer than the model's context of 40"),
    ({"top_p": 0.0}, "top_p=0.0 is invalid: must be a number in (0, 1]"),
    ({"top_p": 1.5}, "top_p=1.5 is invalid"),
    ({"temperature": -0.1}, "temperature=-0.1 is invalid: must be a number >= 0 (0: greedy)"),
    ({"top_k": -1}, "top_k=-1 is invalid: must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid: must be an integer >= 1"),
    ({"model": torch.nn.Linear(3, 3)}, "model='Linear' is invalid: is not a language model"),
])
def test_bad_inputs_are_one_line(options, message):
    options = {"model": tiny_llama("none"), "input_ids": [1, 2, 3], **options}
    with pytest.raises(ConfigError) as error:
        generate(**options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("neuron", ["ternary_attention", "gif"])
def test_cached_decoding_counts_what_one_forward_counts(neuron, one_thread):
    """The operations of a prefill and token-by-token cached steps add up to those of one forward
    over the whole sequence (attention products: each new query against every cached key)."""
    from spikellm.energy import OperationCounter, load_cost_model

    model = tiny_llama(neuron)
    ids = prompt(5)
    energy = generation_energy(model, ids, cost="horowitz45_fp32", max_new_tokens=6)
    sequence = torch.cat([ids, torch.tensor([energy.result.tokens[0][:-1]])], dim=1)
    with OperationCounter(model) as counter, torch.inference_mode():
        model(sequence)
    whole = counter.report(load_cost_model("horowitz45_fp32"))
    parts = {layer.name: layer for layer in energy.prefill.layers}
    for layer in energy.decode.layers:
        total = parts[layer.name]
        for field in ("macs", "scale_macs", "dense_macs", "spikes", "sops", "activations", "nonzero_inputs", "tokens"):
            setattr(total, field, getattr(total, field) + getattr(layer, field))
    for layer in whole.layers:
        for field in ("macs", "scale_macs", "dense_macs", "spikes", "sops", "activations", "nonzero_inputs", "tokens"):
            assert getattr(parts[layer.name], field) == pytest.approx(getattr(layer, field)), (layer.name, field)
    summary = energy.summary()
    assert summary["decode_tokens"] == 5 and summary["generated_tokens"] == 6
    assert summary["uj_per_token"] > 0 and summary["dense_uj_per_token"] > 0
    assert summary["spikes_per_activation"] > 0
