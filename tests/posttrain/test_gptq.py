"""GPTQ (spikellm.quant.gptq) and ternary absmean weights (spikellm.quant.ternary)."""
import pytest
import torch

from spikellm.errors import ConfigError
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.quant.gptq import HessianAccumulator, gptq_layer, gptq_quantize, gptq_quantize_detailed
from spikellm.quant.ternary import TernaryAbsMean
from spikellm.quant.weights import RoundToNearest

IN, OUT, TOKENS = 64, 32, 512


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(TOKENS, IN, generator=g)
    mixing = torch.randn(IN, IN, generator=g) / 8 + 0.3 * torch.eye(IN)
    return z @ mixing, torch.randn(OUT, IN, generator=g)  # correlated inputs, weight


def _output_error(x, weight, quantized):
    return ((x @ weight.T - x @ quantized.T) ** 2).sum().item()


def _hessian(x):
    acc = HessianAccumulator(x.shape[-1])
    acc.add_batch(x)
    return acc.hessian


def test_hessian_accumulates_the_mean_over_batches():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 8, generator=g), torch.randn(7, 8, generator=g), torch.randn(3, 1, 8, generator=g)]
    acc = HessianAccumulator(8)
    for b in batches:
        acc.add_batch(b)
    x = torch.cat([b.reshape(-1, 8) for b in batches]).double()
    assert acc.count == x.shape[0] == 20
    torch.testing.assert_close(acc.hessian, 2.0 / x.shape[0] * x.T @ x)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_stays_on_its_grid(bits, group_size, act_order):
    x, weight = _problem()
    quantizer = RoundToNearest(bits, group_size)
    result = gptq_quantize_detailed(weight, _hessian(x), quantizer, block_size=32, act_order=act_order)
    assert _output_error(x, weight, result.weight) < 0.9 * _output_error(x, weight, quantizer(weight))

    integers = result.weight / result.scales.gather(1, result.group_index.expand(OUT, -1))
    torch.testing.assert_close(integers, torch.round(integers), rtol=0, atol=1e-4)
    assert integers.abs().max() <= quantizer.max_int + 1e-4
    torch.testing.assert_close(result.integers, torch.round(integers), rtol=0, atol=0)
    groups = IN // (group_size or IN)
    assert result.scales.shape == (OUT, groups)
    assert torch.bincount(result.group_index, minlength=groups).tolist() == [IN // groups] * groups
    if not act_order:  # groups are consecutive columns, as RTN's
        assert result.group_index.tolist() == [j // (group_size or IN) for j in range(IN)]


def test_lazy_blocks_do_not_change_the_result():
    """Block size is a speed knob only, also when a group straddles a block boundary."""
    x, weight = _problem(2)
    h = _hessian(x)
    for group_size in (None, 16):
        quantizer = RoundToNearest(3, group_size)
        reference = gptq_quantize(weight, h, quantizer, block_size=IN)
        for block in (1, 8, 24):
            torch.testing.assert_close(gptq_quantize(weight, h, quantizer, block_size=block), reference,
                                       rtol=0, atol=1e-4)


def test_dead_input_columns_get_zero_weights():
    x, weight = _problem(3)
    x[:, [5, 40]] = 0
    for act_order in (False, True):
        q = gptq_quantize(weight, _hessian(x), RoundToNearest(3, 16), act_order=act_order)
        assert torch.isfinite(q).all()
        assert (q[:, [5, 40]] == 0).all()
        assert q.abs().sum() > 0


def test_gptq_layer_overwrites_the_weight_in_place():
    x, weight = _problem(4)
    layer = torch.nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    param = layer.weight
    result = gptq_layer(layer, x.split(100), RoundToNearest(3), act_order=True)
    assert layer.weight is param and layer.weight.requires_grad
    torch.testing.assert_close(layer.weight.detach(), result.weight)
    assert _output_error(x, weight, layer.weight.detach()) < _output_error(x, weight, RoundToNearest(3)(weight))
    with pytest.raises(ConfigError):
        gptq_quantize(weight, _hessian(x), RoundToNearest(3, 24))


def test_gptq_layer_on_a_rotated_layer_keeps_the_function():
    x, weight = _problem(5)
    layer = SpikingLinear(IN, OUT, rotate=True)
    with torch.no_grad():
        layer.weight.copy_(weight)
        reference = layer(x)
    gptq_layer(layer, [x], RoundToNearest(4))
    assert bool(layer.rotation_folded)
    with torch.no_grad():
        out = layer(x)
    rtn = SpikingLinear(IN, OUT, rotate=True, weight_quantizer=RoundToNearest(4))
    with torch.no_grad():
        rtn.weight.copy_(weight)
        rtn_err = ((rtn(x) - reference) ** 2).sum()
    assert ((out - reference) ** 2).sum() < rtn_err


@pytest.mark.parametrize("per_channel", [True, False])
def test_ternary_absmean_values_and_scale(per_channel):
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(8, 32, generator=g) * torch.linspace(0.1, 2, 8).unsqueeze(1)
    quantized = TernaryAbsMean(per_channel=per_channel)(weight)
    scale = weight.abs().mean(-1, keepdim=True) if per_channel else weight.abs().mean().expand(8, 1)
    ratio = quantized / scale
    assert set(ratio.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(ratio, torch.clamp(torch.floor(weight / scale + 0.5), -1, 1))
    assert (ratio == 0).any() and (ratio == 1).any() and (ratio == -1).any()


def test_ternary_gradient_is_straight_through_and_zero_rows_are_finite():
    weight = torch.randn(4, 16, requires_grad=True)
    out = TernaryAbsMean()(weight)
    out.backward(torch.arange(64.0).reshape(4, 16))
    torch.testing.assert_close(weight.grad, torch.arange(64.0).reshape(4, 16))
    assert torch.isfinite(TernaryAbsMean()(torch.zeros(3, 5))).all()
    with pytest.raises(ConfigError):
        TernaryAbsMean(per_channel="yes")
    with pytest.raises(ConfigError):
        TernaryAbsMean(eps=0.0)


def test_spiking_linear_with_ternary_weights_runs_and_backprops():
    torch.manual_seed(7)
    layer = SpikingLinear(16, 8, bias=True, weight_quantizer=TernaryAbsMean())
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 8)
    effective = layer.effective_weight().detach()
    assert all(len(row.abs().unique()) <= 2 for row in effective)
    y.square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
