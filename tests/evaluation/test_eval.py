"""eval.py: perplexity against a hand computation, checkpoints end to end, bad inputs in one line."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

from spikellm.errors import ConfigError, DataError
from spikellm.checkpoints.loader import load_model
from spikellm.evaluation.perplexity import eval_windows, perplexity
from spikellm.models import LlamaConfig


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=16).build().eval()


def test_perplexity_equals_a_hand_computation(tiny):
    tokens = torch.randint(0, 50, (70,))
    nlls = []
    for start in range(0, 70 - 16 + 1, 16):  # 4 full windows, the last 6 tokens dropped (GPTQ)
        window = tokens[start:start + 16]
        logits = tiny(window[None])[0]
        nlls.append(F.cross_entropy(logits[:-1], window[1:], reduction="none"))
    expected = torch.cat(nlls).mean().item()
    result = perplexity(tiny, tokens, seqlen=16, batch_size=3)
    assert result.windows == 4 and result.tokens == 4 * 15
    assert result.nll == pytest.approx(expected, rel=1e-6) and result.ppl == pytest.approx(math.exp(expected), rel=1e-6)


@pytest.mark.parametrize("length,seqlen,stride", [(70, 16, 5), (33, 16, 16), (17, 16, 1), (40, 8, 3)])
def test_sliding_windows_score_every_token_once(length, seqlen, stride):
    scored = []
    for start, end, first in eval_windows(length, seqlen, stride):
        assert end - start <= seqlen
        scored += range(start + first, end)
    if stride == seqlen:
        assert scored == [p for s in range(0, length - seqlen + 1, seqlen) for p in range(s + 1, s + seqlen)]
    else:
        assert scored == list(range(1, length))


def test_sliding_perplexity_matches_a_hand_computation(tiny):
    tokens = torch.randint(0, 50, (40,))
    total, count = 0.0, 0
    for start, end, first in eval_windows(40, 16, 6):
        window = tokens[start:end]
        nll = F.cross_entropy(tiny(window[None])[0][:-1], window[1:], reduction="none")
        total += nll[first - 1:].sum().item()
        count += len(nll[first - 1:])
    result = perplexity(tiny, tokens, seqlen=16, stride=6, batch_size=2)
    assert result.tokens == count == 39
    assert result.nll == pytest.approx(total / count, rel=1e-5)


def test_perplexity_errors(tiny):
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(tiny, torch.zeros(5, dtype=torch.long), seqlen=16)
    with pytest.raises(ConfigError, match="seqlen=32 is invalid: exceeds the model's max_seq_len=16"):
        perplexity(tiny, torch.zeros(64, dtype=torch.long), seqlen=32)


def test_bad_checkpoints_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="ckpt=.*no such file or directory"):
        load_model(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DataError, match="is not a readable checkpoint"):
        load_model(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(DataError, match="is not a train.py checkpoint"):
        load_model(foreign)


def test_train_then_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    int4 = "neuron.weight_quantizer={_target_:spikellm.quant.RoundToNearest,_partial_:true,bits:4}"
    done = run_script("train.py", "experiment=smoke", "trainer.max_steps=5", int4, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    loaded = load_model(checkpoint)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("def f(x): return x")) == "def f(x): return x"
    done = run_script("eval.py", f"ckpt={checkpoint}", "tasks=[tiny_mc]", "limit=4", f"export={tmp_path / 'exported'}",
                      f"hydra.run.dir={tmp_path / 'eval'}")
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    # train -> spiking checkpoint -> load -> eval: the same perplexity, to the last digit
    for spiking in (run / "spiking_checkpoint", tmp_path / "exported"):
        out = tmp_path / f"eval-{spiking.name}"
        done = run_script("eval.py", f"ckpt={spiking}", "backend=torch", f"hydra.run.dir={out}")
        assert done.returncode == 0, done.stderr[-2000:]
        again = json.loads((out / "results.json").read_text())
        assert again["perplexity"]["pydoc"]["ppl"] == results["perplexity"]["pydoc"]["ppl"]
        assert again["model"]["backend"] == "torch"
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "ppl pydoc" in card and "tiny_mc acc" in card and "int4" in card
    assert results["perplexity"]["pydoc"]["ppl"] > 1 and results["energy"]["tokens"] > 0
    assert results["config"]["ckpt"] == str(checkpoint)
    assert 0 <= results["tasks"]["tiny_mc"]["acc"] <= 1 and "acc_norm_stderr" in results["tasks"]["tiny_mc"]
    done = run_script("eval.py", f"ckpt={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'eval2'}")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: ckpt=")


def test_pydoc_perplexity_uses_the_split_the_checkpoint_trained_with(tmp_path):
    """A model trained with seed=1 is measured on the seed-1 held-out documents (the
    seed-0 ones are mostly in its training data), read from the checkpoint."""
    from spikellm.evaluation.pipeline import _held_out

    assert _held_out({"split": {"source": "pydoc", "seed": 1, "val_fraction": 0.05}}, "pydoc") == \
        {"seed": 1, "val_fraction": 0.05}
    assert _held_out({"split": {"source": "text", "seed": 1, "val_fraction": 0.05}}, "pydoc") == {}
    assert _held_out({}, "wikitext2") == {}
    from spikellm.evaluation.perplexity import evaluation_text

    assert evaluation_text("pydoc", seed=1) != evaluation_text("pydoc", seed=0)


def test_a_corpus_that_fails_keeps_the_finished_results(tmp_path):
    """Perplexity.datasets=[pydoc,wikitext2] offline keeps pydoc's result in results.json
    and names what failed in one line (exit 2)."""
    import json

    from conftest import ROOT, run_script

    ckpt = ROOT / "tests" / "fixtures" / "formats" / "lightning" / "last.ckpt"
    done = run_script("eval.py", f"ckpt={ckpt}", "perplexity.datasets=[pydoc,wikitext2]", f"hydra.run.dir={tmp_path}",
                      "perplexity.batch_size=32")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: perplexity wikitext2:")
    results = json.loads((tmp_path / "results.json").read_text())
    assert "pydoc" in results["perplexity"] and "perplexity wikitext2" in results["failed"]
