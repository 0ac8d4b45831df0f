"""Weights as they are stored at scale.

- :class:`PackedWeight` gives back every quantizer's values bit for bit, in the fewest bytes;
- sharded safetensors are written as ``transformers`` writes them and read one tensor at a time,
  with one-line errors for truncated or foreign files;
- models are built without memory and filled in place (ties kept), compute in fp32 over a bf16
  store exactly as an fp32 copy of the same values would, and keep blocks on disk until used.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from spikellm.checkpoints.shards import INDEX, WEIGHTS, TensorFiles, write_tensors
from spikellm.errors import DataError
from spikellm.models.spikify import decoder_blocks
from spikellm.nn.packed import PackedWeight, format_for
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.nn.storage import (assign_parameters, compute_in, empty_names, empty_parameters, is_placeholder,
                                 keep_on_disk, materialized, release_packed)
from spikellm.quant.gptq import gptq_quantize_detailed, HessianAccumulator
from spikellm.quant.ternary import TernaryAbsMean, TernaryGIFGrid
from spikellm.quant.weights import RoundToNearest


def _weight(out=24, inp=40, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("quantizer, fmt", [(RoundToNearest(4), "int4"), (RoundToNearest(3), "int4"),
                                            (RoundToNearest(8, group_size=8), "int8"), (RoundToNearest(2), "ternary"),
                                            (TernaryAbsMean(), "ternary")])
def test_packed_weight_gives_the_quantizer_back_bit_for_bit(quantizer, fmt):
    weight = _weight()
    scale, integers = quantizer.scales_and_integers(weight)
    packed = PackedWeight.from_integers(integers.reshape(24, -1), scale.reshape(24, -1),
                                        fmt=format_for(quantizer.max_int))
    assert packed.fmt == fmt
    assert torch.equal(packed.dequantize(), quantizer(weight))
    assert torch.equal(packed.integers().float(), integers.reshape(24, -1))
    bytes_per_weight = {"ternary": 0.25, "int4": 0.5, "int8": 1.0}[fmt]
    assert packed.data.numel() == 24 * -(-40 * bytes_per_weight // 1)


def test_a_layer_folds_its_quantizer_into_packed_integers():
    layer = SpikingLinear(40, 24, weight_quantizer=RoundToNearest(4, group_size=8))
    x = torch.randn(3, 40)
    with torch.no_grad():
        expected = layer(x)
        layer.fold_weight_quantizer()
        assert layer.weight_quantizer is None and layer.packed is not None and layer.packed.groups == 5
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [RoundToNearest(4), RoundToNearest(4, group_size=8), TernaryGIFGrid()])
def test_gptq_results_pack_with_their_column_scales(grid, act_order):
    x = torch.randn(256, 40, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 2, 40)
    acc = HessianAccumulator(40)
    acc.add_batch(x)
    result = gptq_quantize_detailed(_weight(), acc.hessian, grid, block_size=16, act_order=act_order)
    packed = PackedWeight.from_integers(result.integers, result.scales, result.group_index)
    assert torch.equal(packed.dequantize(), result.weight)
    if isinstance(grid, TernaryGIFGrid):  # two scales per row (ordinary, salient), not one per weight
        assert packed.groups == 2 and packed.group_index is not None
    elif grid.group_size is None:
        assert packed.groups == 1 and packed.group_index is None
    # what a file stores reads back the same
    tensors = packed.tensors("layer")
    again = PackedWeight.from_tensors(tensors.get, "layer", packed.fmt, (24, 40), where="test")
    assert torch.equal(again.dequantize(), result.weight)


def test_packed_tensors_that_do_not_fit_the_layer_are_one_line():
    packed = PackedWeight.from_integers(torch.ones(4, 8), torch.ones(4, 1))
    tensors = packed.tensors("q")
    with pytest.raises(DataError, match="not those of a 4×16 layer"):
        PackedWeight.from_tensors(tensors.get, "q", packed.fmt, (4, 16), where="model.safetensors")
    with pytest.raises(DataError, match="lacks the tensor 'q.qscale'"):
        PackedWeight.from_tensors({"q.qweight": tensors["q.qweight"]}.get, "q", packed.fmt, (4, 8), where="x")


@pytest.mark.parametrize("shard_bytes", [1 << 30, 600])
def test_tensors_round_trip_through_one_file_or_shards(tmp_path, shard_bytes):
    tensors = {f"layer.{i}.weight": torch.randn(8, 16).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(5)}
    tensors["packed"] = torch.randint(0, 255, (4, 3), dtype=torch.uint8)
    files = write_tensors(tmp_path, tensors.items(), {"format": "test"}, max_shard_bytes=shard_bytes)
    if shard_bytes > 1000:
        assert files == [tmp_path / WEIGHTS] and not (tmp_path / INDEX).exists()
    else:
        assert len(files) > 1 and (tmp_path / INDEX).is_file()
        index = json.loads((tmp_path / INDEX).read_text())
        assert set(index["weight_map"]) == set(tensors) and index["metadata"]["format"] == "test"
        assert all(p.name.endswith(f"-of-{len(files):05d}.safetensors") for p in files)
    read = TensorFiles(tmp_path)
    assert read.metadata["format"] == "test" and set(read.names()) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(read.get(name), tensor) and read.get(name).dtype == tensor.dtype
    assert read.get("layer.1.weight", torch.float32).dtype == torch.float32


def test_transformers_reads_our_shards(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    config.save_pretrained(tmp_path)
    write_tensors(tmp_path, model.state_dict().items(), {"format": "pt"}, max_shard_bytes=8000)
    assert (tmp_path / INDEX).is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("cut", [4, 40, -8])
def test_a_truncated_tensor_file_is_one_line(tmp_path, cut):
    write_tensors(tmp_path, {"a": torch.randn(64, 64)}.items())
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(DataError) as raised:
        TensorFiles(tmp_path, fix="write it again")
    message = str(raised.value)
    assert str(path) in message and "truncated" in message and "write it again" in message and "\n" not in message


def _llama(tie=False, layers=2):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_a_model_built_empty_is_filled_in_place(tie):
    source = _llama(tie)
    with empty_parameters():
        model = transformers.AutoModelForCausalLM.from_config(source.config)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary tables computed, not empty
    unknown = assign_parameters(model, source.state_dict().items())
    assert unknown == [] and empty_names(model) == []
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, source(ids).logits)


def test_a_bf16_store_computes_in_fp32_one_block_at_a_time():
    reference = _llama()
    model = _llama().to(torch.bfloat16)
    with torch.no_grad():
        for mine, theirs in zip(reference.parameters(), model.parameters()):
            mine.copy_(theirs.float())  # the same values, held in fp32
    ids = torch.randint(0, 64, (2, 9))
    blocks = decoder_blocks(model)
    with torch.no_grad(), compute_in(model, blocks):
        got = model(ids).logits
    assert got.dtype == torch.float32 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.model.rotary_emb.inv_freq = reference.model.rotary_emb.inv_freq  # (.to(bf16) rounded it)
    with torch.no_grad(), compute_in(model, blocks):
        got = model(ids).logits
        expected = reference(ids).logits
    assert torch.equal(got, expected)


def test_packed_and_on_disk_weights_come_back_only_while_needed():
    layer = SpikingLinear(40, 24, weight_quantizer=RoundToNearest(4)).to(torch.bfloat16)
    layer.fold_weight_quantizer()
    exact = layer.packed.dequantize()
    release_packed(layer)
    assert is_placeholder(layer.weight) and torch.isnan(layer.weight).all()  # loud, not zeros
    with materialized(layer):
        assert torch.equal(layer.weight, exact)
    assert is_placeholder(layer.weight) and layer.weight.dtype == torch.bfloat16

    plain = torch.nn.Linear(8, 4).to(torch.bfloat16)
    stored = plain.weight.detach().clone()
    reads = []
    keep_on_disk(plain.weight, lambda: reads.append(1) or stored)
    with materialized(plain):
        assert plain.weight.dtype == torch.float32 and torch.equal(plain.weight, stored.float())
    assert is_placeholder(plain.weight) and len(reads) == 1  # unchanged: back in its file
    with torch.no_grad(), materialized(plain):
        plain.weight.mul_(2)  # changed: held in memory from then on
    assert not is_placeholder(plain.weight) and torch.equal(plain.weight, (2 * stored.float()).to(torch.bfloat16))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and resets VmHWM")
def test_loading_holds_the_model_once(tmp_path):
    """Peak RSS of loading a bf16 Hugging Face LLaMA into fp32 (the native path, shard by shard)
    is within 1.15x of what the loaded model holds."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=64)).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20MB")
    # a first load imports what loading imports; then the peak (VmHWM) is reset and measured anew
    script = textwrap.dedent(f"""
        import ctypes, gc, torch
        from spikellm.checkpoints.hf import hf_config, load_hf_llama
        def status(key):
            return int([line for line in open('/proc/self/status') if line.startswith(key)][0].split()[1]) * 1024
        config = hf_config({str(tmp_path)!r})
        load_hf_llama({str(tmp_path)!r}, config, dtype=torch.float32)  # dropped at once
        gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
        open('/proc/self/clear_refs', 'w').write('5')
        before = status('VmRSS')
        model = load_hf_llama({str(tmp_path)!r}, config, dtype=torch.float32)
        steady, peak = status('VmRSS'), status('VmHWM')
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        print(before, steady, peak, held)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, steady, peak, held = map(int, done.stdout.split())
    assert held > 100e6
    assert peak - before <= 1.15 * (steady - before), (before, steady, peak, held)
