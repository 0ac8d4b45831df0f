"""An encoder from the user's own package (examples/custom_encoder, the worked example of
docs/encoders.md): built from its neuron YAML, exact (collapsed = temporal), trained 2 steps,
saved as a spiking checkpoint and loaded again once its module is trusted explicitly."""
import sys

import pytest
import torch

from conftest import ROOT
from spikellm.checkpoints import load_model
from spikellm.checkpoints.spiking import save_spiking_checkpoint
from spikellm.config import build_model
from spikellm.config import trust
from spikellm.errors import DataError
from spikellm.evaluation.harness import neuron_config

EXAMPLE = ROOT / "examples" / "custom_encoder"
LLAMA = {"_target_": "spikellm.models.LlamaConfig", "dim": 32, "n_layers": 1, "n_heads": 4, "ffn_dim": 48,
         "max_seq_len": 32}


@pytest.fixture
def burst(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(trust, "_added", [])
    monkeypatch.delenv(trust.TRUST_VARIABLE, raising=False)
    yield neuron_config(str(EXAMPLE / "burst.yaml"))
    sys.modules.pop("burst_encoder", None)


def test_the_collapsed_form_equals_the_spike_train(burst):
    from burst_encoder import BurstEncoder

    encoder = BurstEncoder(bits=5, signed=True)
    x = torch.randn(3, 7, 16) * 3
    spikes, step = encoder.spike_train(x)
    assert spikes.shape[0] == 15 and set(spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(encoder.decode(spikes) * step, encoder(x))


def test_train_save_and_load_a_model_with_it(burst, tmp_path, monkeypatch):
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(load_documents("pydoc")[:20], vocab_size=300, cache_dir=tmp_path / "bpe")
    config = dict(LLAMA, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(config, burst)
    assert type(model.spiking_linears()["layers.0.mlp.up_proj"].encoder).__name__ == "BurstEncoder"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, tokenizer.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):  # the straight-through counts train like any encoder's
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    directory = save_spiking_checkpoint(model, tmp_path / "burst", model_config=config, neuron=burst,
                                        tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"burst_encoder\.BurstEncoder' is refused: outside the trusted modules.*"
                                        r"SPIKELLM_TRUSTED_MODULES=<module>"):
        load_model(directory)
    trust.trust_modules("burst_encoder")
    loaded = load_model(directory)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    monkeypatch.setattr(trust, "_added", [])
    monkeypatch.setenv(trust.TRUST_VARIABLE, "burst_encoder")  # the command line's way
    assert torch.equal(load_model(directory).model(ids).detach(), loaded.model(ids).detach())
