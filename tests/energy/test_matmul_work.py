"""Modules declare the matmul work the operation counter prices (spikellm.nn.work), so
attention products are counted on every supported Hugging Face architecture, not only on the
project's own LLaMA, and energy/ imports no model."""
import pytest
import torch
import transformers

from spikellm.energy import OperationCounter
from spikellm.models.hf import LogitsModel
from spikellm.models.spikify import SPIKING_PROJECTIONS, spikify
from spikellm.nn.work import AttentionWork

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SHAPE, intermediate_size=64, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**SHAPE, intermediate_size=64, num_key_value_heads=2,
                                                  sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SHAPE, intermediate_size=64, num_key_value_heads=2),
    "opt": lambda: transformers.OPTConfig(**SHAPE, ffn_dim=64, word_embed_proj_dim=32),
}


def test_every_supported_attention_architecture_is_tested():
    assert set(CONFIGS) == {arch for arch, layout in SPIKING_PROJECTIONS.items() if layout.attention}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hugging_face_attention_products_are_counted(arch):
    torch.manual_seed(0)
    model = spikify(transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval())
    declared = [m.matmul_work for m in model.modules() if isinstance(getattr(m, "matmul_work", None), AttentionWork)]
    assert len(declared) == 2 and all(w.n_heads == 4 and w.head_dim == 8 for w in declared)
    batch, seq = 3, 10
    ids = torch.randint(0, 64, (batch, seq))
    counter = OperationCounter(LogitsModel(model))
    with torch.no_grad():
        LogitsModel(model)(ids)
    counter.remove()
    products = {name: ops for name, ops in counter.ops.items() if ops.kind == "attention"}
    assert len(products) == 2
    expected = 2 * batch * 4 * seq * (seq + 1) // 2 * 8  # Q·Kᵀ and P·V over the causal pairs
    assert all(ops.dense_macs == expected and ops.macs == expected for ops in products.values())


def test_cached_hugging_face_decoding_counts_what_one_forward_counts():
    torch.manual_seed(0)
    model = spikify(transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval())
    ids = torch.randint(0, 64, (1, 9))
    whole = OperationCounter(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    whole.remove()
    stepped = OperationCounter(model)
    with torch.no_grad():
        out = model(input_ids=ids[:, :5], use_cache=True)
        cache = out.past_key_values
        for t in range(5, 9):
            cache = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).past_key_values
    stepped.remove()
    for name, ops in whole.ops.items():
        if ops.kind == "attention":
            assert stepped.ops[name].dense_macs == ops.dense_macs
