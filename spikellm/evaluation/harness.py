"""lm-evaluation-harness adapter: score a :class:`SpikingLlama` on lm-eval tasks (0.4.x API).

* :class:`SpikeLLMEvalLM` is an lm-eval ``TemplateLM`` registered as ``"spikellm"``. Build it from
  a model and a tokenizer (``SpikeLLMEvalLM(model, tokenizer)``) or from a checkpoint
  (``SpikeLLMEvalLM(ckpt=PATH, neuron=..., device=...)``, which is also what
  ``--model spikellm --model_args ckpt=PATH`` does).
* :func:`run_tasks` wraps ``lm_eval.simple_evaluate``: local task YAMLs (``include_path``) run
  offline with ``TaskManager(include_defaults=False)``; hub tasks (piqa, arc_easy, ...) fail fast
  with a :class:`DataError` when the Hugging Face Hub cannot be reached.
* The lm_eval CLI (0.4.13) has no plugin or entry-point discovery for models: ``--model NAME``
  is looked up in ``lm_eval.api.registry.model_registry``, which only knows lm-eval's own
  models plus classes whose module was imported. :func:`cli_main` imports this module, then runs
  lm-eval's CLI unchanged::

      python -m spikellm.evaluation.harness --model spikellm --model_args ckpt=PATH \\
          --tasks tiny_mc --include_path examples/lm_eval_tasks --device cpu

Scoring is exact for the encoders this project has: they quantize per token, or per channel
with a causal running bound, so a token's logits depend only on the tokens before it. That is
what makes right-padding, batching and serving several requests from one forward pass exact.
"""
from __future__ import annotations

if __name__ == "__main__":
    # ``python -m spikellm.evaluation.harness``: run the CLI from the module under its real name,
    # so the model class is defined and registered once (not a second time as ``__main__``).
    from spikellm.evaluation.harness import cli_main

    raise SystemExit(cli_main())

import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

# lm-eval registers its own models lazily, and ``get_model`` imports them only when the registry
# is empty: register them first, so that ours does not hide "hf", "vllm", ... from ``get_model``.
import lm_eval.models  # noqa: F401,E402  (placeholders only: cheap)
from spikellm.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
# The zero-shot suite of DESIGN.md §1: lm-eval tasks whose data comes from the Hugging Face Hub.

Request = tuple[Any, list[int], list[int]]  # (cache key or None, context tokens, continuation tokens)


@register_model("spikellm")
class SpikeLLMEvalLM(TemplateLM):
    """A spiking LLaMA as an lm-eval language model (causal, greedy, single process).

    Args:
        model: a :class:`~spikellm.models.llama.SpikingLlama` (``forward(ids [B, T]) → logits
            [B, T, V]``); it is moved to ``device`` and put in eval mode.
        tokenizer: its :class:`~spikellm.data.tokenizer.Tokenizer`; its eos token is the prefix
            of empty contexts and of rolling windows, and a stop sequence of generation.
        batch_size: sequences per forward pass (an int; lm-eval's ``"auto"`` falls back to
            ``max_batch_size`` or 8).
        max_length: tokens the model sees at once (default and upper bound: the model's
            ``config.max_seq_len``); longer inputs are truncated from the left.
        device: torch device to run on.
        ckpt: instead of ``model``/``tokenizer``, a checkpoint read by
            :func:`spikellm.checkpoints.load_model` (with ``neuron`` and ``device``).
        neuron: with ``ckpt``: the spike neurons to load the model with (replacing a checkpoint's,
            or spikifying a Hugging Face model): a neuron group name of ``conf/neuron``
            (``gif``, ``ternary``, ...), a path to such a YAML file, or the group as a dict.
        max_gen_toks: default cap of generated tokens for ``generate_until``.
    """

    backend = "causal"

    def __init__(self, model: torch.nn.Module | None = None, tokenizer=None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, device: str | torch.device = "cpu", *, ckpt: str | None = None,
                 neuron: str | None = None, max_batch_size: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        if model is None:
            if ckpt is None:
                raise ConfigError("ckpt", None, "give a model and its tokenizer, or ckpt=<checkpoint path>")
            from spikellm.checkpoints import load_model  # imported on use: lm-eval starts faster

            loaded = load_model(str(ckpt), neuron=neuron_config(neuron), device=str(device))
            model, tokenizer = loaded.model, loaded.tokenizer
        elif ckpt is not None:
            raise ConfigError("ckpt", ckpt, "give either a model object or a checkpoint, not both")
        elif neuron is not None:
            raise ConfigError("neuron", neuron, "only applies when loading a checkpoint (ckpt=...)")
        if tokenizer is None:
            raise ConfigError("tokenizer", None, "a model needs its tokenizer (spikellm.data.Tokenizer)")
        seq_limit = getattr(getattr(model, "config", None), "max_seq_len", None)
        if max_length is None:
            if seq_limit is None:
                raise ConfigError("max_length", None, "the model has no config.max_seq_len: give max_length")
            max_length = seq_limit
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ConfigError("max_length", max_length, "must be a positive integer")
        if seq_limit is not None and max_length > seq_limit:
            raise ConfigError("max_length", max_length, f"must not exceed the model's max_seq_len={seq_limit}")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise ConfigError("max_gen_toks", max_gen_toks, "must be a positive integer")

        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self._max_length = max_length
        self._max_gen_toks = max_gen_toks
        self._batch_size = _parse_batch_size(batch_size, max_batch_size)
        self._eos_text = tokenizer.decode([tokenizer.eos_id])
        self.forward_rows = 0  # sequences run through the model so far (shared prefixes run once)

    # ------------------------------------------------------------------ construction from lm-eval
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "SpikeLLMEvalLM":
        """``"ckpt=PATH,neuron=gif,device=cpu,batch_size=16"`` (``--model_args`` as a string)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "SpikeLLMEvalLM":
        """Keyword arguments from lm-eval: ``arg_dict`` (``--model_args``) wins over the generic
        ``additional_config`` (``--batch_size``, ``--max_batch_size``, ``--device``), so the same key
        in both is no error. The CLI's default device ``cuda:0`` falls back to CPU without CUDA."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        kwargs = {**extra, **arg_dict}
        import inspect

        takes = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(arg_dict) - set(takes))
        if unknown:
            raise ConfigError(f"model_args.{unknown[0]}", arg_dict[unknown[0]],
                              f"is not an argument of the spikellm model; it takes {', '.join(takes)}")
        device = str(kwargs.get("device", "cpu"))
        if "device" not in arg_dict and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s requested but CUDA is not available: running on cpu", device)
            kwargs["device"] = "cpu"
        return cls(**kwargs)

    # ------------------------------------------------------------------ TemplateLM interface
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"spikellm-{self.tokenizer.fingerprint[:16]}"

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "max_length": self.max_length, "tokenizer": self.tokenizer_name}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string`` (our tokenizer adds no special tokens in any case)."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation tokens), all of them greedy)`` per ``(context, continuation)``.

        Tokenized as ``TemplateLM.loglikelihood`` does (trailing spaces of the context move to
        the continuation; encode context+continuation, split at the length of the encoded
        context; an empty context becomes eos), but in one batched call to the tokenizer.
        """
        pairs = [tuple(req.args) for req in requests]
        encoded = self._encode_pairs(pairs)
        return self._loglikelihood_tokens([(pair, ctx, cont) for pair, (ctx, cont) in zip(pairs, encoded)],
                                          disable_tqdm=disable_tqdm)

    def _encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        plans, texts = [], {}
        for context, continuation in pairs:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            if context == "":  # (a context of only spaces too, where TemplateLM would be left with none)
                plans.append(("empty", continuation))
                texts.setdefault(continuation, None)
                continue
            plans.append(("pair", context, context + continuation))
            texts.setdefault(context, None)
            texts.setdefault(context + continuation, None)
        keys = list(texts)
        ids = dict(zip(keys, self.tokenizer.encode_batch(keys))) if keys else {}
        out = []
        for plan in plans:
            if plan[0] == "empty":
                cont = ids[plan[1]]
                if cont and cont[0] == self.prefix_token_id:
                    out.append((cont[:1], cont[1:]))
                else:
                    out.append(([self.prefix_token_id], cont))
            else:
                ctx = ids[plan[1]]
                out.append((ctx, ids[plan[2]][len(ctx):]))
        return out

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: Sequence[Request], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """Score token requests; each model input (context+continuation, truncated from the left to
        ``max_length + 1`` tokens, minus the last) runs at most once: requests whose input is a
        prefix of another's (multiple choice: one context, several continuations) read their
        logits from the longest one's forward pass. Those are batched longest first."""
        limit = self.max_length
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        inputs: dict[int, tuple[int, ...]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) > limit:
                raise ConfigError("max_length", limit, f"a continuation of {len(continuation)} tokens does not fit "
                                                       "in the model's window; raise max_length or shorten it")
            if not continuation:
                results[i] = (0.0, True)
                continue
            if not context:
                raise ValueError("a loglikelihood request needs at least one context token (eos for empty text)")
            inputs[i] = tuple((list(context) + list(continuation))[-(limit + 1):-1])

        host = _prefix_hosts(set(inputs.values()))
        by_host: dict[tuple[int, ...], list[int]] = {}
        for i, seq in inputs.items():
            by_host.setdefault(host[seq], []).append(i)
        hosts = sorted(by_host, key=lambda seq: (-len(seq), seq))

        with tqdm(total=len(inputs), desc="spikellm loglikelihood", disable=disable_tqdm or not inputs) as bar:
            for start in range(0, len(hosts), self.batch_size):
                batch = hosts[start:start + self.batch_size]
                logits = self._forward(batch)
                for row, seq in enumerate(batch):
                    for i in by_host[seq]:
                        continuation = requests[i][2]
                        end = len(inputs[i])
                        logprobs = F.log_softmax(logits[row, end - len(continuation):end].float(), dim=-1)
                        target = torch.tensor(continuation, device=logprobs.device)
                        score = logprobs.gather(-1, target[:, None]).sum().item()
                        greedy = bool((logprobs.argmax(-1) == target).all())
                        results[i] = (score, greedy)
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                    bar.update(len(by_host[seq]))
        return results  # type: ignore[return-value]

    def _forward(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits ``[B, T, V]`` of right-padded ``sequences`` (padding only follows real tokens, so
        under causal attention it changes no logit that is read)."""
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), self.eot_token_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        self.forward_rows += len(sequences)
        return self.model(ids.to(self.device))

    # ------------------------------------------------------------------ rolling loglikelihood
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents (perplexity), lm-eval's way: windows of ``max_length``
        tokens that do not overlap in what they predict, each token predicted exactly once, the
        first one after eos; the last window keeps a full context. Windows of all documents are
        batched together."""
        texts = [req.args[0] for req in requests]
        token_lists = self.tokenizer.encode_batch(texts) if texts else []
        windows: list[Request] = []
        owners: list[int] = []
        for doc, tokens in enumerate(token_lists):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(doc)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(texts)
        for doc, (score, _) in zip(owners, scores):
            totals[doc] += score
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuation of each context until a stop string (``until``, plus eos) or ``max_gen_toks``
        tokens, cut before the first stop string, through :func:`spikellm.generation.generate`
        (the model's cache, left-padded batches). Greedy unless a request samples (``do_sample``
        or a temperature > 0; then its ``top_k`` / ``top_p``, with a fixed seed). Requests are
        batched with others of the same stops, length cap and sampling; a context is cut to its
        last ``max_length - max_gen_toks`` tokens so that the answer fits the context."""
        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], dict(req.args[1] or {}) if len(req.args) > 1 else {}
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if not all(isinstance(stop, str) for stop in until):
                raise ConfigError("until", until, "must be a string or a list of strings")
            stops = tuple(stop for stop in dict.fromkeys([*until, self._eos_text]) if stop)
            max_gen = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            tokens = self.tok_encode(context) or [self.prefix_token_id]
            tokens = tokens[-max(1, self.max_length - max_gen):]
            jobs.append((i, tokens, (stops, max_gen, _sampling(gen_kwargs)),
                         (context, req.args[1] if len(req.args) > 1 else None)))
        jobs.sort(key=lambda job: (repr(job[2]), -len(job[1])))
        outputs: list[str | None] = [None] * len(requests)
        with tqdm(total=len(jobs), desc="spikellm generate_until", disable=disable_tqdm or not jobs) as bar:
            start = 0
            while start < len(jobs):
                batch = [job for job in jobs[start:start + self.batch_size] if job[2] == jobs[start][2]]
                for job, text in zip(batch, self._continue([tokens for _, tokens, _, _ in batch], *batch[0][2])):
                    outputs[job[0]] = text
                    self.cache_hook.add_partial("generate_until", job[3], text)
                bar.update(len(batch))
                start += len(batch)
        return outputs  # type: ignore[return-value]

    @torch.inference_mode()
    def _continue(self, prompts: list[list[int]], stops: tuple[str, ...], max_gen: int, sampling: tuple) -> list[str]:
        from spikellm.generation import generate

        temperature, top_k, top_p = sampling
        if max_gen < 1:
            return ["" for _ in prompts]
        result = generate(self.model, prompts, max_new_tokens=max_gen, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=1234 if temperature > 0 else None,
                          stop=lambda ids: any(stop in self.tok_decode(ids) for stop in stops))
        return [_cut_at_stops(self.tok_decode(tokens), stops) for tokens in result.tokens]


def _sampling(gen_kwargs: dict) -> tuple[float, int, float]:
    """``(temperature, top_k, top_p)`` of an lm-eval request: greedy ``(0, 0, 1)`` unless it samples."""
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not gen_kwargs.get("do_sample") and temperature <= 0:
        return 0.0, 0, 1.0
    return (temperature if temperature > 0 else 1.0, int(gen_kwargs.get("top_k", 0) or 0),
            float(gen_kwargs.get("top_p", 1.0) or 1.0))


def neuron_config(neuron) -> dict | None:
    """The ``neuron`` config group as a dict, as ``load_model`` takes it: ``None`` and dicts pass
    through; a string is a group name under ``conf/neuron`` (installed with the package) or a YAML file path,
    composed with Hydra (so ``defaults:`` lists such as ``gif_obs``'s apply)."""
    if neuron is None or isinstance(neuron, dict):
        return neuron
    from omegaconf import DictConfig, OmegaConf

    if isinstance(neuron, DictConfig):
        return OmegaConf.to_container(neuron, resolve=True)
    if not isinstance(neuron, str):
        raise ConfigError("neuron", neuron, "must be a neuron config name, a YAML path or a dict")
    from spikellm.config.cli import conf_dir

    groups = conf_dir() / "neuron"
    path = Path(neuron).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config_dir, name = path.resolve().parent, path.stem
    elif (groups / f"{neuron}.yaml").is_file():
        config_dir, name = groups, neuron
    else:
        available = ", ".join(sorted(p.stem for p in groups.glob("*.yaml"))) or f"none found in {groups}"
        raise ConfigError("neuron", neuron, f"no such neuron config (available: {available}), "
                                            "nor a YAML file; or pass the group as a dict")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        raise ConfigError("neuron", neuron, "cannot compose a config inside a running Hydra app; pass the "
                                            "neuron group as a dict")
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name=name), resolve=True)


def _prefix_hosts(sequences: Iterable[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Map each sequence to a host: itself, or a sequence that extends it and is a prefix of none.

    In lexicographic order a prefix sorts just before the sequences that extend it, so a sequence
    that is a prefix of any other is a prefix of its successor, whose host serves it too.
    """
    ordered = sorted(sequences)
    host: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in range(len(ordered) - 1, -1, -1):
        seq = ordered[i]
        following = ordered[i + 1] if i + 1 < len(ordered) else None
        host[seq] = host[following] if following is not None and following[:len(seq)] == seq else seq
    return host


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    cuts = [text.index(stop) for stop in stops if stop in text]
    return text[:min(cuts)] if cuts else text


def _parse_batch_size(batch_size, max_batch_size) -> int:
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            fallback = int(max_batch_size) if max_batch_size else DEFAULT_BATCH_SIZE
            log.warning("batch_size=%s: spikellm does not search batch sizes; using %d", batch_size, fallback)
            return fallback
        if batch_size.strip().isdigit():
            batch_size = int(batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be a positive integer (or 'auto')")
    return batch_size


def cli_main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line with the ``spikellm`` model registered (this module is imported).

    ``argv`` as after the program name (default: ``sys.argv[1:]``); the same arguments as
    ``lm_eval``/``lm-eval``, e.g. ``--model spikellm --model_args ckpt=PATH --tasks ... --include_path DIR``.
    """
    from lm_eval.__main__ import cli_evaluate

    from spikellm.config.cli import one_line_errors

    if argv is not None:
        sys.argv = [sys.argv[0] if sys.argv else "spikellm-lm-eval", *argv]
    with one_line_errors():  # an unreadable ckpt=, a bad neuron=: one line and exit 2, as eval.py
        cli_evaluate()
    return 0
