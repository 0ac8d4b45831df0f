"""Text generation for every model here: sampling, stops, batches of prompts, and its energy.

:func:`generate` continues token ids with a cache where the model has one:

* the native LLaMA (:class:`~spikellm.models.llama.SpikingLlama`) with its
  :class:`~spikellm.models.llama.KVCache` (exact: a per-token code depends on its own token only,
  and a per-channel key code's running maximum is carried in the cache);
* the MatMul-free LM with its recurrent state (constant memory per token);
* a Hugging Face causal LM (spikified or not) with its own ``past_key_values``.

``use_cache=False`` reruns the whole sequence every step instead (the reference, and the way for
a model with neither). Prompts of different lengths go in one batch left-padded (a list of lists,
or ids with an ``attention_mask``); positions count tokens only, so each prompt generates what it
generates alone. :func:`generation_energy` counts the operations of a generation
(:class:`~spikellm.energy.OperationCounter`) and prices prefill and decoding apart.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from spikellm.errors import ConfigError

#: why a sequence stopped: its end-of-sequence token, a stop sequence or callback, ``max_new_tokens``,
#: or the model's context
STOP_REASONS = ("eos", "stop", "length", "context")


@dataclass
class GenerationResult:
    """``tokens``: the generated ids of each prompt (a final eos or stop sequence included);
    ``stop_reasons``: one of :data:`STOP_REASONS` per prompt; ``prompt_lengths``: tokens per prompt."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    prompt_lengths: list[int]


def generate(model: nn.Module, input_ids, attention_mask: Tensor | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int | None = None, generator: torch.Generator | None = None,
             stop: Sequence[Sequence[int]] | Callable[[list[int]], bool] | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             streamer: Callable[[list[int | None]], None] | None = None,
             pad_token_id: int = 0, use_cache: bool = True) -> GenerationResult:
    """Continue ``input_ids``: ``[T]``/``[B, T]`` ids (``attention_mask`` 0 at left padding), or a
    list of ints, or a list of such lists (left-padded here with ``pad_token_id``).

    ``temperature`` 0 is greedy; above, tokens are sampled from ``softmax(logits / temperature)``
    cut to the ``top_k`` most likely (0: all) and to the smallest set of probability ``>= top_p``,
    with ``generator`` or a fresh one seeded by ``seed``. ``repetition_penalty`` divides the positive
    logits (multiplies the negative ones) of tokens already in the sequence (CTRL's rule).
    A sequence stops at ``eos_token_id`` (an id or several), when its generated ids end with one of
    the ``stop`` sequences or ``stop(generated ids)`` says so, after ``max_new_tokens``, or at the
    model's context. ``streamer(new)``, after every step, receives each sequence's new id (None for
    those that stopped).
    """
    return _generate(**{name: value for name, value in locals().items()})


def _generate(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
              seed, generator, stop, eos_token_id, streamer, pad_token_id, use_cache, on_phase=None):
    """:func:`generate`; ``on_phase("prefill" | "decode" | "done")`` is called before the prompts'
    forward, before the first cached step and at the end."""
    check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    runner = _runner(model, use_cache)
    device = next(runner.model.parameters()).device
    ids, mask = _prompts(input_ids, attention_mask, pad_token_id, device)
    batch, width = ids.shape
    context = runner.context
    if context is not None and width > context:
        raise ConfigError("input_ids", f"{width} tokens", f"the prompt is longer than the model's context of {context} "
                                                          "tokens: shorten it")
    # token k (1-based) is read from the forward of position width + k - 2
    budget = max_new_tokens if context is None else min(max_new_tokens, context - width + 1)
    padded = bool((~mask).any())
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    eos = {int(token) for token in eos}
    stops = [] if stop is None or callable(stop) else [list(map(int, s)) for s in stop if len(s)]
    if generator is None and temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, _vocab(runner.model), dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(mask, ids, ids[:, -1:]), True)  # padding as the last token, which is one

    generated: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[str | None] = [None] * batch
    with torch.inference_mode():
        if on_phase is not None:
            on_phase("prefill")
        logits = runner.prefill(ids, mask if padded else None)
        step = 0
        while True:
            tokens = _next_tokens(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
            new = tokens.tolist()
            shown: list[int | None] = []
            for row, token in enumerate(new):
                if reasons[row] is not None:
                    shown.append(None)
                    continue
                generated[row].append(token)
                shown.append(token)
                reasons[row] = _stop_reason(generated[row], token, eos, stops, stop, budget, max_new_tokens)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if streamer is not None:
                streamer(shown)
            if all(reason is not None for reason in reasons):
                break
            if step == 0 and on_phase is not None:
                on_phase("decode")
            step += 1
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            logits = runner.step(tokens, mask if padded else None)
    if on_phase is not None:
        on_phase("done")
    return GenerationResult(generated, [str(r) for r in reasons], mask[:, :width].sum(-1).tolist())


def _stop_reason(generated, token, eos, stops, stop, budget, max_new_tokens) -> str | None:
    if token in eos:
        return "eos"
    if any(generated[-len(s):] == s for s in stops) or (callable(stop) and stop(list(generated))):
        return "stop"
    if len(generated) >= max_new_tokens:
        return "length"
    if len(generated) >= budget:
        return "context"
    return None


def check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    """One ConfigError line per bad setting (generate.py checks them before loading anything)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError("max_new_tokens", max_new_tokens, "must be an integer >= 1")
    if not number(temperature) or temperature < 0:
        raise ConfigError("temperature", temperature, "must be a number >= 0 (0: greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError("top_k", top_k, "must be an integer >= 0 (0: no top-k cut)")
    if not number(top_p) or not 0 < top_p <= 1:
        raise ConfigError("top_p", top_p, "must be a number in (0, 1] (1: no nucleus cut)")
    if not number(repetition_penalty) or repetition_penalty <= 0:
        raise ConfigError("repetition_penalty", repetition_penalty, "must be a number > 0 (1: none)")


def _prompts(input_ids, attention_mask, pad_token_id: int, device) -> tuple[Tensor, Tensor]:
    """``(ids [B, T], mask [B, T] bool)`` left-padded, each prompt checked non-empty."""
    if isinstance(input_ids, Tensor):
        ids = input_ids.to(device=device, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2:
            raise ConfigError("input_ids", f"shape {tuple(input_ids.shape)}", "must be [T] or [B, T] token ids")
        mask = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(device=device, dtype=torch.bool))
        if mask.shape != ids.shape:
            raise ConfigError("attention_mask", f"shape {tuple(mask.shape)}",
                              f"must match input_ids {tuple(ids.shape)}")
    else:
        rows = list(input_ids)
        rows = [rows] if not rows or not isinstance(rows[0], (list, tuple, Tensor)) else rows
        rows = [[int(t) for t in row] for row in rows]
        width = max((len(row) for row in rows), default=0)
        ids = torch.tensor([[pad_token_id] * (width - len(row)) + row for row in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in rows], device=device)
        ids, mask = ids.reshape(len(rows), width), mask.reshape(len(rows), width)
    if ids.numel() == 0 or not bool(mask.any(-1).all()):
        empty = 0 if ids.numel() == 0 else int((~mask.any(-1)).nonzero()[0])
        raise ConfigError("input_ids", f"prompt {empty}: no tokens", "a prompt must hold at least one token "
                                                                    "(a BOS token, if nothing else)")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ConfigError("attention_mask", "right padding", "pad prompts on the left (the last column must be tokens)")
    return ids, mask


def _vocab(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "vocab_size"))


@torch.no_grad()
def _next_tokens(logits: Tensor, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                 seen: Tensor | None, generator) -> Tensor:
    """The next id per row from last-position ``logits [B, vocab]``."""
    logits = logits.float()
    if seen is not None:
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty),
                             logits)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        cut = (before >= top_p).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(cut, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the models' ways to continue a sequence --------------------------------------------------
class _Runner:
    """Calls a model for a prefill and then one token per step; ``context``: its longest sequence."""

    context: int | None = None

    def __init__(self, model: nn.Module):
        self.model = model

    def prefill(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def step(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        raise NotImplementedError


class _Stateful(_Runner):
    """A spikellm model through its decoding protocol: ``new_state()``, then ``forward(ids,
    state=..., attention_mask=...)`` for the prompts and for each new token."""

    def __init__(self, model):
        super().__init__(model)
        self.context, self.state = model.max_context, None

    def prefill(self, ids, mask):
        self.state = self.model.new_state()
        return self.model(ids, state=self.state, attention_mask=mask)[:, -1]

    def step(self, tokens, mask):
        return self.model(tokens[:, None], state=self.state, attention_mask=mask)[:, -1]


class _HuggingFace(_Runner):
    """A ``transformers`` causal LM through its own cache; positions from the mask (left padding)."""

    def __init__(self, model, use_cache: bool):
        super().__init__(model)
        from spikellm.models.hf import max_positions

        self.context, self.use_cache, self.past = max_positions(model.config), use_cache, None
        self.positional = "position_ids" in inspect.signature(model.forward).parameters
        self.ids = None

    def _call(self, ids, mask, **kwargs):
        if self.positional:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        return self.model(input_ids=ids, attention_mask=mask.long(), **kwargs)

    def prefill(self, ids, mask):
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        self.ids, self.mask = ids, mask
        out = self._call(ids, mask, use_cache=self.use_cache)
        self.past = out.past_key_values if self.use_cache else None
        return out.logits[:, -1]

    def step(self, tokens, mask):
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        if not self.use_cache:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
            return self._call(self.ids, self.mask, use_cache=False).logits[:, -1]
        out = self._call(tokens[:, None], self.mask, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1]


class _Uncached(_Runner):
    """Reruns the whole sequence every step (the reference cached decoding must equal)."""

    def __init__(self, runner: _Runner):
        super().__init__(runner.model)
        self.context, self.inner = runner.context, runner

    def prefill(self, ids, mask):
        self.ids, self.mask = ids, mask
        return self.inner.prefill(ids, mask)

    def step(self, tokens, mask):
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        return self.inner.prefill(self.ids, mask)


def context_of(model: nn.Module) -> int | None:
    """The longest sequence :func:`generate` runs ``model`` on (None: unbounded, a recurrent model)."""
    return _runner(model, True).context


def unwrap(model: nn.Module) -> nn.Module:
    """The module :func:`generate` calls: the spikellm model inside a ``transformers`` one
    (:class:`~spikellm.checkpoints.hub.SpikellmForCausalLM`), and a
    :class:`~spikellm.models.hf.LogitsModel`'s HF model."""
    model = getattr(model, "spikellm_model", model)
    return getattr(model, "hf_model", model)


def _runner(model: nn.Module, use_cache: bool) -> _Runner:
    model = unwrap(model)
    if callable(getattr(model, "new_state", None)):  # spikellm's own: the decoding protocol
        runner = _Stateful(model)
    elif callable(getattr(model, "can_generate", None)) and model.can_generate():
        return _HuggingFace(model, use_cache and "past_key_values" in inspect.signature(model.forward).parameters)
    else:
        raise ConfigError("model", type(model).__name__, "is not a language model: generate() takes a SpikingLlama, "
                                                         "a MatMulFreeLM or a Hugging Face causal LM")
    return runner if use_cache else _Uncached(runner)


# ---- energy ---------------------------------------------------------------------------------------
@dataclass
class GenerationEnergy:
    """A generation and its counted operations: ``prefill`` (the prompts) and ``decode`` (every
    cached step after it; its tokens are the ids fed, one per sequence and step) reports."""

    result: GenerationResult
    prefill: "EnergyReport"  # noqa: F821
    decode: "EnergyReport"  # noqa: F821

    def summary(self) -> dict:
        """Per generated (decoded) token: energy in µJ, spiking and dense, and spikes per activation
        (overall and per encoded layer), on the reports' cost model."""
        decode = self.decode
        return {
            "cost_model": decode.cost.name,
            "prompt_tokens": sum(self.result.prompt_lengths),
            "generated_tokens": sum(len(t) for t in self.result.tokens),
            "decode_tokens": decode.tokens,
            "uj_per_token": 1e6 * decode.per_token(decode.joules),
            "dense_uj_per_token": 1e6 * decode.per_token(decode.dense_joules),
            "ratio_to_dense": decode.ratio_to_dense,
            "prefill_uj_per_token": 1e6 * self.prefill.per_token(self.prefill.joules),
            "spikes_per_activation": decode.spikes_per_activation,
            "layers": {layer.name: layer.spikes_per_activation for layer in decode.layers if layer.encoded},
        }


def generation_energy(model: nn.Module, input_ids, cost="horowitz45_fp32", **options) -> GenerationEnergy:
    """:func:`generate` (cached; ``options`` are its settings) under an
    :class:`~spikellm.energy.OperationCounter`, priced on ``cost`` (a
    :class:`~spikellm.energy.CostModel` or the name of one in ``conf/energy``).

    The reports are what eval.py's ``energy.json`` holds (``report.to_dict()``); the decode report
    counts each step's operations with the cache: the new query against every cached key."""
    from spikellm.energy import OperationCounter, cost_model

    arguments = inspect.signature(generate).bind(model, input_ids, **options)  # TypeError names a wrong option
    arguments.apply_defaults()
    if not arguments.arguments["use_cache"]:
        raise ConfigError("use_cache", False, "the energy of generation is that of cached decoding")
    cost = cost_model(cost)
    counter = OperationCounter(unwrap(model))
    marks: dict[str, tuple] = {}

    def on_phase(phase: str) -> None:
        marks[phase] = counter.snapshot()

    try:
        result = _generate(**arguments.arguments, on_phase=on_phase)
        batch = len(result.tokens)
        decoding = marks.get("decode", marks["done"])  # none when every sequence stopped at its first token
        prefill = counter.report(cost, since=marks["prefill"], until=decoding, sequences=batch)
        decode = counter.report(cost, since=decoding, until=marks["done"], sequences=batch)
    finally:
        counter.remove()
    return GenerationEnergy(result, prefill, decode)
