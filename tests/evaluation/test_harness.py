"""lm-evaluation-harness adapter: exact scores against direct computation, offline local tasks, errors."""
import json
import time
import types

import pytest
import torch
import torch.nn.functional as F

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from spikellm.data import build_tokenizer
from conftest import ROOT
from spikellm.errors import ConfigError, DataError
from spikellm.evaluation import harness, tasks
from spikellm.evaluation.harness import SpikeLLMEvalLM
from spikellm.evaluation.tasks import run_tasks
from spikellm.models.llama import LlamaConfig

TASKS = ROOT / "examples" / "lm_eval_tasks"
TOY_TASK = "tiny_mc"

DOCS = [
    "The cat sat on the mat and the dog sat on the rug.",
    "Question: What color is the sky? Answer: blue.",
    "Bees make honey, cows give milk, and the sun rises in the east.",
    "Two plus two is four; three plus three is six.",
    "In winter the days are short and the nights are cold.",
    "A spiking neuron integrates its input and fires when it reaches the threshold.",
    "The quick brown fox jumps over the lazy dog again and again.",
    "Is water wet? Yes, water is wet, and ice is cold.",
]
LONG_TEXT = " ".join(DOCS) + " " + " ".join(reversed(DOCS))  # well over 64 tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(DOCS, 320, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = LlamaConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=64).build()
    with torch.no_grad():  # peakier logits than the 0.02 init, so greedy choices are clear-cut
        model.embed_tokens.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return SpikeLLMEvalLM(model, tokenizer, batch_size=4)


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def encode_pair(tokenizer, context, continuation):
    """lm-eval's causal split, written out: trailing spaces go to the continuation, the whole is
    encoded and cut at the context's length; an empty context is eos."""
    if context == "":
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped)
    return context_ids, tokenizer.encode(stripped + continuation)[len(context_ids):]


@torch.no_grad()
def direct_score(model, context_ids, continuation_ids, max_length):
    """log p(continuation | context) from one unbatched forward pass, truncated from the left."""
    full = (context_ids + continuation_ids)[-(max_length + 1):]
    logits = model(torch.tensor([full[:-1]]))[0, -len(continuation_ids):]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(continuation_ids)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


@torch.no_grad()
def greedy_ids(model, ids, steps):
    ids = list(ids)
    out = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
        out.append(token)
    return out


PAIRS = [
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " mat and slept"),  # same context, longer continuation
    ("The cat sat on the", " rug"),
    ("The cat sat on the ", "hat"),  # trailing space moves to the continuation
    ("", "Bees make honey"),  # empty context: conditioned on eos
    ("Question: Is water wet?\nAnswer:", " yes"),
    ("Question: Is water wet?\nAnswer:", " no"),
    (LONG_TEXT, " the end"),  # longer than max_length: truncated from the left
]


def test_loglikelihood_equals_direct_computation(lm, model, tokenizer):
    assert len(tokenizer.encode(LONG_TEXT)) > 2 * model.config.max_seq_len
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(PAIRS, got):
        expected, expected_greedy = direct_score(model, *encode_pair(tokenizer, context, continuation), 64)
        assert score == pytest.approx(expected, abs=1e-4), (context[:30], continuation)
        assert greedy == expected_greedy
    # the batched tokenization is TemplateLM's own, pair by pair
    assert TemplateLM.loglikelihood(lm, requests("loglikelihood", PAIRS), disable_tqdm=True) == got
    # a context of only spaces is an empty one, its spaces moved to the continuation
    spaces, empty = lm.loglikelihood(requests("loglikelihood", [("  ", "Bees"), ("", "  Bees")]), disable_tqdm=True)
    assert spaces == empty


def test_truncation_to_a_shorter_max_length(model, tokenizer):
    short = SpikeLLMEvalLM(model, tokenizer, batch_size=3, max_length=12)
    pairs = [(LONG_TEXT, " the end"), ("The cat sat on the", " mat and slept"), (DOCS[5], " again")]
    got = short.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (score, _) in zip(pairs, got):
        expected, _ = direct_score(model, *encode_pair(tokenizer, context, continuation), 12)
        assert score == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ConfigError, match="max_length"):
        short.loglikelihood(requests("loglikelihood", [("A", " " + DOCS[5])]), disable_tqdm=True)
    with pytest.raises(ConfigError, match="max_seq_len"):
        SpikeLLMEvalLM(model, tokenizer, max_length=65)


def test_is_greedy_on_the_model_own_continuation(lm, model, tokenizer):
    context = tokenizer.encode("The quick brown fox")
    greedy = greedy_ids(model, context, 4)
    other = [*greedy[:3], (greedy[3] + 1) % tokenizer.vocab_size]
    (score, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    assert is_greedy and not not_greedy
    assert score == pytest.approx(direct_score(model, context, greedy, 64)[0], abs=1e-4)


def test_shared_context_scored_in_one_forward_pass(model, tokenizer):
    lm = SpikeLLMEvalLM(model, tokenizer, batch_size=8)
    context = "Question: Where does the sun rise?\nAnswer:"
    choices = [" in", " in the", " in the east", " in the west", " in the east"]  # nested, one repeated
    got = lm.loglikelihood(requests("loglikelihood", [(context, c) for c in choices]), disable_tqdm=True)
    # inputs are context + continuation[:-1]: " in the east" and " in the west" both serve the rest
    assert lm.forward_rows <= 2
    for choice, (score, greedy) in zip(choices, got):
        assert (score, greedy) == pytest.approx(direct_score(model, *encode_pair(tokenizer, context, choice), 64),
                                                abs=1e-4)
    # one-token continuations after one context share an identical input: a single row
    lm.forward_rows = 0
    ids = tokenizer.encode(context)
    lm._loglikelihood_tokens([(None, ids, [t]) for t in range(10)])
    assert lm.forward_rows == 1


def test_loglikelihood_rolling_equals_window_computation(model, tokenizer):
    window = 16
    lm = SpikeLLMEvalLM(model, tokenizer, batch_size=3, max_length=window)
    docs = [LONG_TEXT, DOCS[0], ""]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)

    @torch.no_grad()
    def direct(text):
        tokens = tokenizer.encode(text)
        total, predicted = 0.0, 0
        while predicted < len(tokens):  # predict tokens[predicted:end] once, with as much context as fits
            end = min(predicted + window, len(tokens))
            inputs = ([tokenizer.eos_id] + tokens)[max(0, end - window):end]
            logprobs = F.log_softmax(model(torch.tensor([inputs]))[0].float(), dim=-1)[-(end - predicted):]
            total += logprobs.gather(-1, torch.tensor(tokens[predicted:end])[:, None]).sum().item()
            predicted = end
        return total

    assert len(tokenizer.encode(LONG_TEXT)) > 4 * window
    assert got[2] == 0.0
    for text, score in zip(docs, got):
        assert score == pytest.approx(direct(text), abs=1e-3)
    # a single window is the loglikelihood of the text after eos
    whole = SpikeLLMEvalLM(model, tokenizer)
    rolled = whole.loglikelihood_rolling(requests("loglikelihood_rolling", [(DOCS[0],)]), disable_tqdm=True)
    scored = whole.loglikelihood(requests("loglikelihood", [("", DOCS[0])]), disable_tqdm=True)
    assert rolled[0] == pytest.approx(scored[0][0], abs=1e-4)


def test_generate_until_is_greedy_and_stops(model, tokenizer):
    lm = SpikeLLMEvalLM(model, tokenizer, batch_size=2)
    contexts = ["The cat sat on the", "Two plus two is", LONG_TEXT]  # the last one slides past 64 tokens

    @torch.no_grad()
    def direct(context, steps):
        seq, generated = tokenizer.encode(context), []
        for _ in range(steps):
            token = int(model(torch.tensor([seq[-64:]]))[0, -1].argmax())
            seq.append(token)
            generated.append(token)
            if token == tokenizer.eos_id:
                break
        return tokenizer.decode(generated).split("<|endoftext|>")[0]

    expected = [direct(c, 6) for c in contexts]
    args = [(c, {"until": [], "max_gen_toks": 6}) for c in contexts]
    assert lm.generate_until(requests("generate_until", args), disable_tqdm=True) == expected
    # a stop string cuts the text before its first occurrence
    text = expected[0]
    stop = next((ch for ch in text[1:] if ch.strip()), None)
    if stop is not None:
        args = [(contexts[0], {"until": [stop], "max_gen_toks": 6})]
        assert lm.generate_until(requests("generate_until", args)) == [text[:text.index(stop)]]


def test_example_task_runs_offline_end_to_end(lm, tokenizer, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.chdir(tmp_path)  # relative data_files resolve against the YAML, not the working directory

    def no_hub(*_):
        raise AssertionError("a local task must not touch lm-eval's default index or the hub")

    monkeypatch.setattr(tasks, "_default_manager", no_hub)
    monkeypatch.setattr(tasks, "_hub_reachable", no_hub)
    results = run_tasks(lm, [TOY_TASK], include_path=str(TASKS), limit=None, num_fewshot=0)
    assert set(results) == {TOY_TASK}
    metrics = results[TOY_TASK]
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}

    # the same accuracies by hand from the adapter's log-likelihoods
    items = [json.loads(line) for line in (TASKS / f"{TOY_TASK}.jsonl").read_text().splitlines() if line.strip()]
    assert len(items) == 8
    acc = acc_norm = 0.0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = [s for s, _ in lm.loglikelihood(requests("loglikelihood", [(context, " " + c) for c in item["choices"]]),
                                                 disable_tqdm=True)]
        norm = [s / len(c) for s, c in zip(scores, item["choices"])]
        acc += float(scores.index(max(scores)) == item["label"]) / len(items)
        acc_norm += float(norm.index(max(norm)) == item["label"]) / len(items)
    assert metrics["acc"] == pytest.approx(acc)
    assert metrics["acc_norm"] == pytest.approx(acc_norm)
    for name in ("acc", "acc_norm"):  # sample stderr of a mean of 0/1 outcomes
        p = metrics[name]
        assert metrics[f"{name}_stderr"] == pytest.approx((p * (1 - p) / (len(items) - 1)) ** 0.5)


def test_local_task_with_missing_data_is_a_data_error(lm, tmp_path):
    (tmp_path / "broken.yaml").write_text((TASKS / f"{TOY_TASK}.yaml").read_text()
                                          .replace(f"task: {TOY_TASK}", "task: broken_mc")
                                          .replace(f"examples/lm_eval_tasks/{TOY_TASK}.jsonl", "missing.jsonl"))
    with pytest.raises(DataError, match="broken_mc"):
        run_tasks(lm, ["broken_mc"], include_path=tmp_path)


def test_hub_task_offline_fails_fast_with_a_clear_message(lm, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(tasks, "_hub_reachable", lambda *a: False)
    for task in ("piqa", "arc_easy", "hellaswag"):
        start = time.monotonic()
        with pytest.raises(DataError, match="include_path") as err:
            run_tasks(lm, [task], include_path=TASKS)
        assert time.monotonic() - start < 2  # known hub tasks: no index of lm-eval's tasks, no retries
        assert task in str(err.value) and "\n" not in str(err.value)


def test_hub_probe_is_bounded_in_time():
    start = time.monotonic()
    reachable = tasks._hub_reachable()  # the corpora's probe: a 3 s connection timeout
    assert isinstance(reachable, bool) and time.monotonic() - start < 6


def test_unknown_task_is_a_config_error_naming_it(lm, monkeypatch):
    monkeypatch.setattr(tasks, "_hub_reachable", lambda *a: False)
    with pytest.raises(ConfigError, match="no_such_task") as err:
        run_tasks(lm, [TOY_TASK, "no_such_task"], include_path=TASKS)
    assert err.value.key == "tasks" and TOY_TASK in str(err.value)  # lists the local tasks
    with pytest.raises(ConfigError, match="include_path"):
        run_tasks(lm, ["no_such_task"])
    # an lm-eval task beyond the six hub names is recognised as one (then needs the hub)
    with pytest.raises(DataError, match="lambada_openai"):
        run_tasks(lm, ["lambada_openai"], include_path=TASKS)
    with pytest.raises(ConfigError, match="include_path"):
        run_tasks(lm, [TOY_TASK], include_path=TASKS / "missing")


def test_registered_and_built_from_checkpoint_args(model, tokenizer, monkeypatch):
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("spikellm") is SpikeLLMEvalLM
    assert "hf" in model_registry  # lm-eval's own models stay available

    calls = []

    def load_model(ckpt, neuron=None, device="cpu"):
        calls.append((ckpt, neuron, device))
        return types.SimpleNamespace(model=model, tokenizer=tokenizer)

    monkeypatch.setattr("spikellm.checkpoints.loader.load_model", load_model)
    lm = SpikeLLMEvalLM.create_from_arg_string("ckpt=/tmp/run/last.ckpt,neuron=gif,batch_size=16",
                                               {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    assert calls == [("/tmp/run/last.ckpt", harness.neuron_config("gif"), "cpu")]
    assert calls[0][1]["encoder"]["_target_"] == "spikellm.neurons.GIFEncoder"  # conf/neuron/gif.yaml
    assert lm.batch_size == 16 and lm.max_length == 64 and lm.model is model
    # the CLI's default device falls back to cpu without CUDA; "auto" batch size is accepted
    lm = SpikeLLMEvalLM.create_from_arg_obj({"ckpt": "x"}, {"batch_size": "auto", "device": "cuda:0"})
    if not torch.cuda.is_available():
        assert lm.device == torch.device("cpu")
    with pytest.raises(ConfigError, match="ckpt"):
        SpikeLLMEvalLM()
    with pytest.raises(ConfigError, match="available: .*ternary"):
        SpikeLLMEvalLM(ckpt="x", neuron="no_such_neuron")
    # an argument the model does not take ended in a TypeError traceback
    with pytest.raises(ConfigError, match=r"^model_args\.foo=1 is invalid: is not an argument of the spikellm "
                                          r"model; it takes model, tokenizer, batch_size"):
        SpikeLLMEvalLM.create_from_arg_string("ckpt=x,foo=1")


def test_hugging_face_directory_through_model_args(tokenizer, tmp_path):
    """ckpt= a local Hugging Face LLaMA directory, spikified by neuron=ternary on load."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, eos_token_id=tokenizer.eos_id))
    hf.save_pretrained(tmp_path)
    tokenizer.save(tmp_path)
    lm = SpikeLLMEvalLM.create_from_arg_string(f"ckpt={tmp_path},neuron=ternary", {"device": "cpu", "batch_size": 2})
    assert len(lm.model.spiking_linears()) == 7 and all(m.encoder is not None for m in lm.model.spiking_linears().values())
    pairs = PAIRS[:3]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (score, _) in zip(pairs, got):
        expected, _ = direct_score(lm.model, *encode_pair(lm.tokenizer, context, continuation), 64)
        assert score == pytest.approx(expected, abs=1e-4)


def test_hub_tasks_load_through_lm_eval_index(lm, tmp_path, monkeypatch):
    """The online path, with lm-eval's index replaced by one holding the example task as if built in."""
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.chdir(ROOT)  # lm-eval resolves data_files against the working directory
    monkeypatch.setattr(tasks, "_default_manager", lambda: TaskManager(include_path=str(TASKS),
                                                                          include_defaults=False))
    monkeypatch.setattr(tasks, "_hub_reachable", lambda *a: True)
    results = run_tasks(lm, [TOY_TASK], limit=4)
    assert set(results[TOY_TASK]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


def test_lm_eval_cli_with_an_unreadable_ckpt_is_one_line(tmp_path, capsys):
    """``spikellm-lm-eval --model_args ckpt=<unreadable file>`` ended in a traceback."""
    from spikellm.evaluation.harness import cli_main

    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--model", "spikellm", "--model_args", f"ckpt={tmp_path / 'notes.ckpt'}", "--tasks", "tiny_mc",
                  "--include_path", str(ROOT / "examples" / "lm_eval_tasks"), "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ckpt=") and "is not a readable checkpoint" in err[-1]
