"""The spiking checkpoint (spikellm/checkpoints/spiking.py): save → load rebuilds the very model that wrote it.

- backend="torch": logits bit-identical to the writer, for every weight format (int4, int8, grouped
  int, ternary, float), encoder, tied or untied head, Hadamard rotation, Optimal Brain Spiking;
- backend="triton" (the Triton interpreter here): the eligible projections run the kernels, the
  others keep the float path, and the logits stay within float rounding of the torch backend;
- packed weights: a quantized checkpoint is smaller than the float one;
- anything missing, corrupt or inconsistent is a DataError naming it, never a partial model.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import spikellm.kernels
from spikellm.checkpoints.card import model_card
from spikellm.checkpoints.spiking import (is_spiking_checkpoint, load_spiking_checkpoint, read_config,
                                          save_spiking_checkpoint)
from spikellm.checkpoints.weights import weight_format
from spikellm.config import build_neuron
from spikellm.errors import ConfigError, DataError
from spikellm.kernels import packed_width
from spikellm.models import LlamaConfig
from spikellm.ops.hadamard import hadamard_transform
from spikellm.neurons.stats import spike_report, track_spikes
from spikellm.nn.kernel_linear import kernel_eligible, use_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)  # widths 32, 16, 48
CARD = {"val ppl": 12.5, "energy (mJ/token)": 0.42}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def partial(target, **kwargs):
    return {"_target_": target, "_partial_": True, **kwargs}


TERNARY4 = partial("spikellm.neurons.TernaryEncoder", bits=4)
TERNARY5 = partial("spikellm.neurons.TernaryEncoder", bits=5)
GIF = partial("spikellm.neurons.GIFEncoder", bits=5, levels=4, signed=True)
BITPLANE = partial("spikellm.neurons.BitPlaneEncoder", bits=5, signed=True)
IF_GAMMA = partial("spikellm.neurons.IFEncoder", bits=4, signed=True, gamma=0.9)
OUTLIER = partial("spikellm.neurons.TernaryEncoder", bits=5, clip=6, residual="outlier")
LSQ = partial("spikellm.neurons.TernaryEncoder", bits=4, learnable_step=True)
INT4 = partial("spikellm.quant.RoundToNearest", bits=4)
INT8 = partial("spikellm.quant.RoundToNearest", bits=8)
INT4_G16 = partial("spikellm.quant.RoundToNearest", bits=4, group_size=16)
INT8_G8 = partial("spikellm.quant.RoundToNearest", bits=8, group_size=8)
TERNARY_W = partial("spikellm.quant.TernaryAbsMean")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    return build_tokenizer(load_documents("pydoc")[:20], vocab_size=300, cache_dir=tmp_path_factory.mktemp("bpe"))


def model_config(tokenizer, tie=True) -> dict:
    return {"_target_": "spikellm.models.LlamaConfig", "vocab_size": tokenizer.vocab_size, **ARCH,
            "tie_embeddings": tie}


def allocate(model, plan):
    """Optimal Brain Spiking on some projections: ``plan(i) -> (addbit, separate) or None``."""
    for i, layer in enumerate(model.spiking_linears().values()):
        choice = plan(i)
        if choice is not None and layer.encoder is not None:
            addbit, separate = choice
            mask = torch.arange(layer.in_features) % 3 == 0
            layer.encoder.allocate_channels(mask, addbit, separate)


def obs_mixed(i):  # separate and shared clusters, one projection left alone
    return [(2, False), (1, True), None][i % 3]


def obs_wide(i):  # ternary b4 with 32× the steps on one projection: counts up to 224, beyond int8
    return (5, False) if i == 6 else obs_mixed(i)


def build_model(tokenizer, encoder, quantizer, tie=True, rotate=False, obs=None, seed=0):
    neuron = {"encoder": encoder, "weight_quantizer": quantizer, "rotate": rotate}
    encoder_factory, quantizer_factory = build_neuron(neuron)
    torch.manual_seed(seed)
    config = model_config(tokenizer, tie)
    model = LlamaConfig(**{k: v for k, v in config.items() if k != "_target_"}).build(
        encoder_factory, quantizer_factory, rotate=rotate)
    with torch.no_grad():  # non-trivial norms: a few large channels, as real activations have
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.copy_(1 + torch.rand(param.shape) * (torch.arange(param.numel()) % 7 == 0) * 4)
        for layer in model.spiking_linears().values():
            if layer.encoder is not None and layer.encoder.step_scale is not None:
                layer.encoder.step_scale.fill_(0.7)  # a learned step (LSQ) other than 1
    if obs is not None:
        allocate(model, obs)
    return model.eval(), config, neuron


def input_ids(tokenizer):
    return torch.randint(0, tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def save(model, directory, config, neuron, tokenizer, **kwargs):
    return save_spiking_checkpoint(model, directory, model_config=config, neuron=neuron, tokenizer=tokenizer,
                                   card=CARD, cost_model="45nm", **kwargs)


def expected_routed(layer) -> bool:
    """The kernels take: a uniform-count encoder on per-token steps without outlier stream or separate
    clusters, counts within int8, and integer weights with one scale per row."""
    encoder = layer.encoder
    fmt, _, group = weight_format(layer)
    if encoder is None or fmt == "float" or group is not None:
        return False
    if getattr(encoder, "residual", "drop") == "outlier" and encoder.clip is not None:
        return False
    if encoder.separate_clusters is not None and bool(encoder.separate_clusters):
        return False
    scale = 1 if encoder.channel_scale is None else int(encoder.channel_scale.max())
    return max(abs(encoder.min_count), encoder.max_count) * scale <= 127


CASES = {
    "int4-ternary-tied": dict(encoder=TERNARY4, quantizer=INT4),
    "int8-gif-untied": dict(encoder=GIF, quantizer=INT8, tie=False),
    "int4-group16-bitplane": dict(encoder=BITPLANE, quantizer=INT4_G16),
    "int8-group8-gif-untied": dict(encoder=GIF, quantizer=INT8_G8, tie=False),
    "ternary-ternary-rotate-untied": dict(encoder=TERNARY5, quantizer=TERNARY_W, tie=False, rotate=True),
    "float-gif": dict(encoder=GIF, quantizer=None),
    "float-ternary-rotate": dict(encoder=TERNARY4, quantizer=None, rotate=True),
    "int4-bitplane-rotate-untied": dict(encoder=BITPLANE, quantizer=INT4, tie=False, rotate=True),
    "int4-ternary-obs": dict(encoder=TERNARY4, quantizer=INT4, obs=obs_wide),
    "int8-if-gamma-obs-rotate": dict(encoder=IF_GAMMA, quantizer=INT8, rotate=True, obs=obs_mixed),
    "ternary-gif-obs-untied": dict(encoder=GIF, quantizer=TERNARY_W, tie=False, obs=obs_mixed),
    "int4-ternary-outlier": dict(encoder=OUTLIER, quantizer=INT4),
    "int4-lsq": dict(encoder=LSQ, quantizer=INT4),
    "int4-no-encoder": dict(encoder=None, quantizer=INT4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, tokenizer, case, monkeypatch):
    model, config, neuron = build_model(tokenizer, **CASES[case])
    ids = input_ids(tokenizer)
    with torch.no_grad():
        expected = model(ids)
    directory = save(model, tmp_path / "ckpt", config, neuron, tokenizer)
    assert directory == tmp_path / "ckpt"

    # the files: config, weights, card, tokenizer; nothing pickled, nothing left half-written
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= files
    assert not {p for p in files if Path(p).suffix in PICKLE_SUFFIXES}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert is_spiking_checkpoint(directory)
    saved = read_config(directory)
    originals = model.spiking_linears()
    assert set(saved["layers"]) == set(originals)
    tensors = load_file(str(directory / "model.safetensors"))
    for name, layer in originals.items():
        fmt, bits, group = weight_format(layer)
        info = saved["layers"][name]
        assert (info["weight_format"], info["bits"], info["group_size"]) == (fmt, bits, group)
        assert (info["in_features"], info["out_features"], info["rotate"]) == (
            layer.in_features, layer.out_features, layer.rotate)
        if fmt == "float":
            assert f"{name}.qweight" not in tensors and f"{name}.weight" in tensors
        else:  # packed integers instead of the float weight
            assert f"{name}.weight" not in tensors
            packed = tensors[f"{name}.qweight"]
            assert packed.shape == (layer.out_features, packed_width(layer.in_features, fmt))
            assert packed.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
            groups = 1 if group is None else layer.in_features // group
            assert tensors[f"{name}.qscale"].shape == (layer.out_features, groups)
    assert ("lm_head.weight" in tensors) != CASES[case].get("tie", True)  # a tied head is stored once
    card = (directory / "README.md").read_text()
    assert "| val ppl | 12.5 | |" in card and "| energy (mJ/token) | 0.42 | |" in card and "45nm" in card
    assert card == model_card(saved, directory.name)

    # backend="torch": bit-identical logits, and the same tokenizer
    loaded, loaded_tokenizer, loaded_config = load_spiking_checkpoint(directory, backend="torch")
    assert loaded_config == saved
    assert not loaded.training
    assert all(layer.kernel_forward is None for layer in loaded.spiking_linears().values())
    with torch.no_grad():
        got = loaded(ids)
    assert torch.equal(got, expected), f"logits differ by up to {(got - expected).abs().max().item():.3g}"
    text = "def f(x):\n    return x + 1  # spikes"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.eos_id == tokenizer.eos_id
    assert loaded.config.tie_embeddings == CASES[case].get("tie", True)
    if loaded.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    for name, layer in loaded.spiking_linears().items():
        original = originals[name]
        assert layer.rotate == original.rotate
        if original.encoder is not None and original.encoder.channel_scale is not None:  # the OBS allocation
            assert torch.equal(layer.encoder.channel_scale, original.encoder.channel_scale)
            assert torch.equal(layer.encoder.separate_clusters, original.encoder.separate_clusters)
        if weight_format(original)[0] != "float":
            integers, scales = layer.packed.integers(), layer.packed.scales
            weight = original.weight.detach()  # the quantizer sees W H when the layer rotates
            reference_scale, reference_integers = original.weight_quantizer.scales_and_integers(
                hadamard_transform(weight) if original.rotate else weight)
            assert torch.equal(integers.float(), reference_integers.reshape(integers.shape))
            assert torch.equal(scales, reference_scale.reshape(scales.shape))
            assert torch.equal(layer.packed.dequantize(), original.effective_weight().detach())

    # backend="triton": the eligible projections run the kernels, every projection stays correct
    calls = []
    real_spike_linear = spikellm.kernels.spike_linear
    monkeypatch.setattr(spikellm.kernels, "spike_linear", lambda *a, **k: calls.append(1) or real_spike_linear(*a, **k))
    kernel_model, _, _ = load_spiking_checkpoint(directory, backend="triton")
    expected_routes = {name: expected_routed(layer) for name, layer in originals.items()}
    routes = {name: layer.kernel_forward is not None for name, layer in kernel_model.spiking_linears().items()}
    assert routes == expected_routes
    assert {name: kernel_eligible(layer) for name, layer in kernel_model.spiking_linears().items()} == expected_routes
    assert use_kernels(kernel_model) == expected_routes  # idempotent, and says what it routed
    for name, layer in kernel_model.spiking_linears().items():
        if routes[name]:  # the kernel reads the weights as stored: packed, not widened
            assert layer.packed.fmt == saved["layers"][name]["weight_format"]
            assert torch.equal(layer.packed.data, tensors[f"{name}.qweight"])
    track_spikes(kernel_model)
    track_spikes(loaded)
    with torch.no_grad():
        got = kernel_model(ids)
        loaded(ids)
    assert len(calls) == sum(expected_routes.values())
    # the kernel path keeps the firing statistics the energy report reads, equal to the float path's
    assert spike_report(kernel_model) == spike_report(loaded)
    if not any(expected_routes.values()):
        assert torch.equal(got, expected)
    else:
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale)


def test_kernels_route_every_eligible_kind(tokenizer):
    """The routing table of the cases above covers both outcomes for each reason a layer is kept out."""
    routed = {}
    for case, spec in CASES.items():
        model, _, _ = build_model(tokenizer, **spec)
        routed[case] = [expected_routed(layer) for layer in model.spiking_linears().values()]
    assert all(routed["int4-ternary-tied"]) and all(routed["int8-gif-untied"])
    assert all(routed["ternary-ternary-rotate-untied"]) and all(routed["int4-lsq"])
    for case in ("int4-group16-bitplane", "int8-group8-gif-untied", "float-gif", "int4-ternary-outlier",
                 "int4-no-encoder"):
        assert not any(routed[case]), case
    # OBS: shared clusters are routed, separate ones and counts beyond int8 are not
    assert routed["int4-ternary-obs"] == [True, False, True, True, False, True, False]
    assert routed["int8-if-gamma-obs-rotate"] == [True, False, True, True, False, True, True]


def test_auto_backend_on_cpu_is_torch(tmp_path, tokenizer):
    model, config, neuron = build_model(tokenizer, TERNARY4, INT4)
    save(model, tmp_path / "ckpt", config, neuron, tokenizer)
    loaded, _, _ = load_spiking_checkpoint(tmp_path / "ckpt")
    assert all(layer.kernel_forward is None for layer in loaded.spiking_linears().values())
    ids = input_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_packed_weights_are_smaller(tmp_path, tokenizer):
    sizes = {}
    for fmt, quantizer in [("float", None), ("int8", INT8), ("int4", INT4), ("ternary", TERNARY_W)]:
        model, config, neuron = build_model(tokenizer, TERNARY4, quantizer, tie=False)
        directory = save(model, tmp_path / fmt, config, neuron, tokenizer)
        path = directory / "model.safetensors"
        header = int.from_bytes(path.read_bytes()[:8], "little")  # names, shapes and digests: not the weights
        sizes[fmt] = path.stat().st_size - 8 - header
    assert sizes["ternary"] < sizes["int4"] < sizes["int8"] < sizes["float"]
    # the projections' weights shrink by their packing: 4 bytes a weight → 1, 1/2, 1/4 (+ one fp32 scale a row)
    linears = model.spiking_linears().values()
    weights = sum(layer.weight.numel() for layer in linears)
    rows = sum(layer.out_features for layer in linears)
    for fmt, per_weight in [("int8", 1), ("int4", 0.5), ("ternary", 0.25)]:
        saving = sizes["float"] - sizes[fmt]
        assert saving == pytest.approx(weights * (4 - per_weight) - rows * 4, abs=64), fmt


# ---- errors ----------------------------------------------------------------------------------

LAYER = "layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    model, config, neuron = build_model(tokenizer, TERNARY4, INT4, tie=False)
    return save(model, tmp_path_factory.mktemp("base") / "ckpt", config, neuron, tokenizer)


@pytest.fixture
def broken(tmp_path, checkpoint):
    """A copy of the checkpoint to damage."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def edit_tensors(directory, change):
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "spikellm-spiking-checkpoint"})


def edit_bytes(directory, change):
    """Change tensors in place and keep the file's metadata (digests included): what a tool that
    edits weights, or a flipped bit on disk, leaves behind."""
    from safetensors import safe_open

    path = str(directory / "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_edited_weight_bytes_are_refused(broken):
    """Embedding signs flipped (same shapes, same header) once evaluated at another
    perplexity with exit 0; the tensors' digests name the tensor and the file now."""
    edit_bytes(broken, lambda t: t["model.embed_tokens.weight" if "model.embed_tokens.weight" in t
                                   else "embed_tokens.weight"].neg_())
    assert_refused(broken, r"model.safetensors: the bytes of tensor embed_tokens.weight are not those it was "
                           r"written with \(the file was edited or corrupted\)")


def test_a_flipped_byte_in_packed_integers_is_refused(broken):
    def flip(tensors):
        name = next(n for n in tensors if n.endswith(".qweight"))
        tensors[name].view(-1)[7] ^= 1
    edit_bytes(broken, flip)
    assert_refused(broken, r"\.qweight are not those it was written with")


def test_weights_whose_digests_were_stripped_are_refused(broken):
    """An edit that also drops the digests from the header is caught by config.json's record of them."""
    from safetensors import safe_open

    path = str(broken / "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    metadata.pop("spikellm_tensor_sha256")
    tensors["embed_tokens.weight"].neg_()
    save_file(tensors, path, metadata=metadata)
    assert_refused(broken, r"the weights do not carry the tensor digests config.json records for them")
    edit_config(broken, lambda c: c.pop("weights_sha256"))  # every digest stripped
    assert_refused(broken, r"config.json lacks the digest of its weights \(weights_sha256\)")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused(broken, value):
    edit_tensors(broken, lambda t: t["norm.weight"].__setitem__(3, value))  # written without digests
    assert_refused(broken, "tensor norm.weight holds non-finite values")


def assert_refused(directory, match, error=DataError, **kwargs):
    with pytest.raises(error, match=match):
        load_spiking_checkpoint(directory, **kwargs)


def test_the_intact_copy_loads(broken):
    model, _, _ = load_spiking_checkpoint(broken, backend="torch")
    assert len(model.spiking_linears()) == 7


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0], ids=["half", "last-bytes", "empty"])
def test_truncated_weights(broken, keep):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    assert_refused(broken, "model.safetensors.*truncated or corrupt")


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    assert_refused(broken, "model.safetensors")


@pytest.mark.parametrize("text", ['{"format": "spikellm-spiking-checkpoint", "version"', "", "\x00\xff garbage"],
                         ids=["truncated", "empty", "binary"])
def test_corrupt_config(broken, text):
    (broken / "config.json").write_text(text, errors="surrogateescape")
    assert_refused(broken, "config.json.*cannot be read")
    assert not is_spiking_checkpoint(broken)


@pytest.mark.parametrize("text", ["[]", "null"], ids=["list", "null"])
def test_config_that_is_not_an_object(broken, text):
    """Valid JSON, but not an object: still a corrupt config.json, not an AttributeError."""
    (broken / "config.json").write_text(text)
    assert not is_spiking_checkpoint(broken)
    assert_refused(broken, "config.json")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    assert not is_spiking_checkpoint(broken)
    assert_refused(broken, "config.json.*cannot be read")


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(format="some-other-checkpoint"), "not a spikellm spiking checkpoint.*some-other"),
    (lambda c: c.pop("format"), "not a spikellm spiking checkpoint"),
    (lambda c: c.update(version=2), "format version 2"),
    (lambda c: c.pop("version"), "format version None"),
], ids=["format", "no-format", "version", "no-version"])
def test_other_format_or_version(broken, change, match):
    edit_config(broken, change)
    assert_refused(broken, match)
    with pytest.raises(DataError, match=match):
        read_config(broken)


@pytest.mark.parametrize("suffix", ["qweight", "qscale"])
def test_missing_packed_tensor(broken, suffix):
    edit_tensors(broken, lambda t: t.pop(f"{LAYER}.{suffix}"))
    assert_refused(broken, f"lacks the tensor '{LAYER}.{suffix}'")


@pytest.mark.parametrize("key", ["norm.weight", "lm_head.weight", "layers.0.input_layernorm.weight"])
def test_missing_float_tensor(broken, key):
    edit_tensors(broken, lambda t: t.pop(key))
    assert_refused(broken, f"does not match config.json.*{key}")


def test_unexpected_tensor(broken):
    edit_tensors(broken, lambda t: t.update({"layers.0.extra": torch.zeros(3)}))
    assert_refused(broken, "does not match config.json.*layers.0.extra")


@pytest.mark.parametrize("change", [
    lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:, :-1].contiguous()}),
    lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:-1].contiguous()}),
    lambda t: t.update({f"{LAYER}.qscale": t[f"{LAYER}.qscale"][:-1].contiguous()}),
], ids=["qweight-columns", "qweight-rows", "qscale-rows"])
def test_packed_tensor_of_the_wrong_shape(broken, change):
    edit_tensors(broken, change)
    assert_refused(broken, LAYER)


def test_scales_of_the_wrong_groups(broken):
    """Three scales a row for a 32-wide layer (not a grouping of it) is named, not a reshape error."""
    edit_tensors(broken, lambda t: t.update({f"{LAYER}.qscale": t[f"{LAYER}.qscale"].repeat(1, 3).contiguous()}))
    assert_refused(broken, LAYER)


@pytest.mark.parametrize("change,match", [
    (lambda c: c["model"].update(dim=64), "layer 'layers.0.self_attn.q_proj'"),
    (lambda c: c["model"].update(ffn_dim=64), "layer 'layers.0.mlp.gate_proj'"),
    (lambda c: c["layers"][LAYER].update(in_features=64), f"layer '{LAYER}'"),
    (lambda c: c["layers"][LAYER].update(out_features=16), f"layer '{LAYER}'"),
    (lambda c: c["layers"].update({"layers.1.self_attn.q_proj": c["layers"][LAYER]}), "layers.1.self_attn.q_proj"),
    (lambda c: c["layers"].update({"embed_tokens": c["layers"][LAYER]}), "embed_tokens"),
    (lambda c: c["model"].update(n_layers=2), "missing"),
], ids=["dim", "ffn_dim", "in_features", "out_features", "extra-layer", "not-a-projection", "n_layers"])
def test_config_that_does_not_match_the_weights(broken, change, match):
    edit_config(broken, change)
    assert_refused(broken, match)


def test_config_with_another_vocabulary(broken):
    """vocab_size edited: the embedding no longer fits, which is a DataError like every other mismatch."""
    edit_config(broken, lambda c: c["model"].update(vocab_size=c["model"]["vocab_size"] + 3))
    assert_refused(broken, "embed_tokens|vocab")


def test_rotation_the_config_does_not_describe(tmp_path, tokenizer):
    """A rotated model saved with a neuron config that does not say ``rotate``: config.json still records
    every projection as rotated, so loading must rebuild the rotation or refuse, never silently differ."""
    model, config, neuron = build_model(tokenizer, TERNARY4, INT4, rotate=True)
    directory = save(model, tmp_path / "ckpt", config, {**neuron, "rotate": False}, tokenizer)
    assert all(info["rotate"] for info in read_config(directory)["layers"].values())
    ids = input_ids(tokenizer)
    try:
        loaded, _, _ = load_spiking_checkpoint(directory, backend="torch")
    except DataError as error:
        assert "rotat" in str(error)
    else:
        with torch.no_grad():
            got, expected = loaded(ids), model(ids)
        assert torch.equal(got, expected), f"logits differ by up to {(got - expected).abs().max().item():.3g}"


def test_tokenizer_larger_than_the_model(broken, tmp_path):
    """Another tokenizer put in the directory: ids beyond the embedding are refused, not an index error later."""
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    other = build_tokenizer(load_documents("pydoc")[:20], vocab_size=600, cache_dir=tmp_path / "bpe")
    assert other.vocab_size > 300
    other.save(broken)
    assert_refused(broken, "tokenizer has .* tokens but the model only")


def test_missing_tokenizer(broken):
    """The message named data.tokenizer_path, a key of training, not the model's."""
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    assert_refused(broken, r"^ckpt=.* holds no tokenizer that can be loaded .*put the model's tokenizer files")


def test_bad_backend(checkpoint):
    for backend in ("gpu", "cuda", "", "Torch"):
        with pytest.raises(ConfigError, match="backend"):
            load_spiking_checkpoint(checkpoint, backend=backend)


def test_saving_into_an_existing_directory_is_refused(tmp_path, tokenizer, checkpoint):
    model, config, neuron = build_model(tokenizer, GIF, INT8)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    with pytest.raises(ConfigError, match="already exists"):
        save(model, checkpoint, config, neuron, tokenizer)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert [p.name for p in checkpoint.parent.iterdir()] == ["ckpt"]  # no half-written sibling

    # an existing empty directory is refused as well
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        save(model, tmp_path / "empty", config, neuron, tokenizer)
    assert list((tmp_path / "empty").iterdir()) == []

    # overwrite=True replaces it, once the new checkpoint is complete
    target = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    save(model, target, config, neuron, tokenizer, overwrite=True)
    assert read_config(target)["layers"][LAYER]["weight_format"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty"]


def test_failed_save_leaves_nothing(tmp_path, tokenizer):
    class BrokenTokenizer:
        eos_id = 0

        def save(self, directory):
            raise OSError("disk full")

    model, config, neuron = build_model(tokenizer, TERNARY4, INT4)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "ckpt", config, neuron, BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []
