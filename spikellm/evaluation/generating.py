"""generate.py's job: load any model file, continue a prompt (streamed) or a file of prompts
(written as JSONL), and say how fast and at what energy per generated token."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from spikellm.energy.cost import cost_model
from spikellm.errors import ConfigError, Interrupted, DataError


@dataclass
class GenerationRun:
    """What a generate.py run did: its continuations, speed and energy summary."""

    records: list[dict]
    tokens_per_second: float
    energy: dict
    output: str | None


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """``(where, prompt)`` of each prompt of a ``.txt`` file (one per non-blank line) or a
    ``.jsonl`` file (``{"prompt": ...}`` per line), ``where`` naming its line (``prompts=<file>:<n>``);
    an empty or malformed file, or an empty prompt, is one line naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise ConfigError("prompts", str(path), f"{what}; pass a .txt (one prompt per line) or .jsonl file")
    try:
        lines = [(f"prompts={path}:{number}", line)
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"prompts={path} cannot be read ({type(error).__name__}: {error})") from None
    if path.suffix == ".jsonl":
        prompts = []
        for where, line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise DataError(f"{where} has no \"prompt\" string")
            if not record["prompt"].strip():
                raise DataError(f"{where} has an empty prompt: give the text to continue, or drop the line")
            prompts.append((where, record["prompt"]))
        lines = prompts
    if not lines:
        raise DataError(f"prompts={path} holds no prompt")
    return lines


def check_settings(cfg: DictConfig) -> str:
    """Every generate.py setting, before anything is loaded: one ConfigError line for the first
    that is wrong; returns the device to run on."""
    from spikellm.io import check_writable
    from spikellm.checks import check_device, check_int
    from spikellm.generation import check_options

    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ConfigError("prompt", cfg.prompt, "give one of prompt=\"...\" (streamed) or prompts=<file.txt|jsonl>")
    if cfg.prompt is not None and not str(cfg.prompt).strip():
        raise ConfigError("prompt", cfg.prompt, "is empty: give the text to continue")
    check_options(**{key: cfg[key] for key in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                "repetition_penalty")})
    check_int("seed", cfg.seed, 0)
    check_int("batch_size", cfg.batch_size, 1)
    if any(not stop for stop in stop_strings(cfg.stop)):
        raise ConfigError("stop", cfg.stop, "an empty stop string would end every continuation at once")
    device = check_device(cfg.device)
    if cfg.prompts is not None:
        output = Path(cfg.output).expanduser()
        if output.resolve() == Path(cfg.prompts).expanduser().resolve():
            raise ConfigError("output", str(output), "is the prompts file, which would be overwritten: give another path")
        if output.is_dir():
            raise ConfigError("output", str(output), "is a directory: give the path of the .jsonl file to write")
        if output.exists():
            raise ConfigError("output", str(output), "already holds generations (of an earlier run): give another "
                                                     "path or another hydra.run.dir; nothing is overwritten")
        check_writable(output.parent, key="output")
    return device


def stop_strings(stop) -> list[str]:
    """``stop=`` as strings: a plain string is one stop string (not its characters), a list is several."""
    if stop is None:
        return []
    if isinstance(stop, (list, tuple, ListConfig)):
        return [str(s) for s in stop]
    return [str(stop)]


def run_generation(cfg: DictConfig, out=sys.stdout) -> GenerationRun:
    """Load ``cfg.ckpt``, generate for ``cfg.prompt`` (streamed to ``out``) or each prompt of
    ``cfg.prompts`` (JSONL to ``cfg.output``), counting operations on ``cfg.energy``."""
    from spikellm.checkpoints import load_model
    from spikellm.io import atomic_write_text
    from spikellm.generation import generation_energy

    device = check_settings(cfg)  # every setting before a billion weights are read, not after
    numbered = [("prompt", str(cfg.prompt))] if cfg.prompt is not None else read_prompts(cfg.prompts)
    prompts = [prompt for _, prompt in numbered]
    stops = stop_strings(cfg.stop)
    cost = cost_model(cfg.energy)
    neuron = OmegaConf.to_container(cfg.neuron, resolve=True) if cfg.get("neuron") else None
    sampling = {key: cfg[key] for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")}
    sampling.update({key: float(sampling[key]) for key in ("temperature", "top_p", "repetition_penalty")})
    loaded = load_model(cfg.ckpt, neuron=neuron, device=device, backend=cfg.get("backend", "auto"),
                        dtype=cfg.get("dtype", "auto"))
    tokenizer = loaded.tokenizer
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    _check_lengths(loaded.model, numbered, encoded)  # all of them, before the first is generated
    options = dict(**sampling, eos_token_id=tokenizer.eos_id,
                   stop=(lambda ids: any(stop in tokenizer.decode(ids) for stop in stops)) if stops else None)
    streamed = _Stream(tokenizer, out, prompts[0]) if cfg.prompt is not None else None
    records, generated, seconds, reports = [], 0, 0.0, []
    size = int(cfg.batch_size)
    def write(records: list[dict]) -> str:
        return str(atomic_write_text(Path(cfg.output).expanduser(),
                                     "".join(json.dumps(record) + "\n" for record in records)))

    for start in range(0, len(encoded), size):
        batch = encoded[start:start + size]
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + start)
        began = time.perf_counter()
        try:
            with torch.inference_mode():
                run = generation_energy(loaded.model, batch, cost=cost, generator=generator,
                                        streamer=streamed, **options)
        except KeyboardInterrupt:  # Ctrl-C: the finished batches are kept
            if cfg.prompts is None or not records:
                raise
            raise Interrupted(f"{len(records)} of {len(prompts)} prompts were generated and are written to "
                              f"{write(records)}") from None
        seconds += time.perf_counter() - began
        reports.append(run)
        for prompt, tokens, reason in zip(prompts[start:start + size], run.result.tokens, run.result.stop_reasons):
            text = _cut(tokenizer.decode(tokens), stops)
            generated += len(tokens)
            records.append({"prompt": prompt, "completion": text, "new_tokens": len(tokens), "stop_reason": reason})
    if streamed is not None:
        streamed.finish()
    output = write(records) if cfg.prompts is not None else None
    return GenerationRun(records, generated / seconds if seconds else 0.0, _energy(reports), output)


def _check_lengths(model, numbered: list[tuple[str, str]], encoded: list[list[int]]) -> None:
    """Each prompt must fit the model's context; the first that does not is named (its file line)."""
    from spikellm.generation import context_of

    context = context_of(model)
    for (where, _), ids in zip(numbered, encoded):
        if not ids:
            raise ConfigError(where, "", "encodes to no token: give some text to continue")
        if context is not None and len(ids) > context:
            raise ConfigError(where, f"{len(ids)} tokens", f"longer than the model's context of {context} tokens: "
                                                           "shorten the prompt")


def _cut(text: str, stops: list[str]) -> str:
    cuts = [text.index(stop) for stop in stops if stop in text]
    return text[:min(cuts)] if cuts else text


def _energy(runs) -> dict:
    """The summary of every batch's decoding, weighted by its decoded tokens."""
    summaries = [run.summary() for run in runs]
    tokens = sum(s["decode_tokens"] for s in summaries)
    if not tokens:
        return summaries[0]
    merged = dict(summaries[0])
    for key in ("uj_per_token", "dense_uj_per_token"):
        merged[key] = sum(s[key] * s["decode_tokens"] for s in summaries) / tokens
    merged["ratio_to_dense"] = merged["uj_per_token"] / merged["dense_uj_per_token"]
    spikes = [s for s in summaries if s["spikes_per_activation"] is not None]
    merged["spikes_per_activation"] = (sum(s["spikes_per_activation"] * s["decode_tokens"] for s in spikes) /
                                       sum(s["decode_tokens"] for s in spikes)) if spikes else None
    merged["decode_tokens"], merged["generated_tokens"] = tokens, sum(s["generated_tokens"] for s in summaries)
    return merged


class _Stream:
    """Prints one sequence's text as its tokens come (the decoded text's new part each step, so
    tokens that only make a character together print once it is whole)."""

    def __init__(self, tokenizer, out, prompt: str):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""
        self.out.write(prompt)  # the continuation follows the prompt, as in the text it extends

    def __call__(self, new: list[int | None]) -> None:
        if new[0] is None:
            return
        self.ids.append(new[0])
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # half a character: wait for the rest
            return
        self.out.write(text[len(self.shown):] if text.startswith(self.shown) else text)
        self.out.flush()
        self.shown = text

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()


def print_generation(run: GenerationRun) -> None:
    """The closing lines: speed, energy per generated token next to dense, spikes per activation."""
    from rich.console import Console

    energy = run.energy
    spikes = energy.get("spikes_per_activation")
    console = Console(stderr=True, soft_wrap=True)
    console.print(f"{energy['generated_tokens']} tokens at {run.tokens_per_second:.3g} tokens/s (energy counter on); "
                  f"{energy['uj_per_token']:.2f} µJ per generated token, dense {energy['dense_uj_per_token']:.2f} µJ "
                  f"({energy['ratio_to_dense']:.3f}×) on {energy['cost_model']}; "
                  + (f"{spikes:.3f} spikes per activation" if spikes is not None else "no spiking layers"))
    if run.output:
        console.print(f"{len(run.records)} continuations written to {run.output}")
