"""Perplexity with the protocol of GPTQ and OmniQuant, and a sliding-window variant.

The evaluation text is the corpus's test split joined with ``"\\n\\n"`` and tokenized once. By
default it is cut into non-overlapping windows of ``seqlen`` tokens (a last partial window is
dropped, as GPTQ does); each window predicts its tokens 1..seqlen-1 and the perplexity is
``exp(mean token NLL)``. With ``stride < seqlen`` the windows overlap: each starts ``stride``
tokens after the previous one and scores only the tokens no earlier window scored, so every token
after the first is predicted once, with up to ``seqlen - stride`` tokens of extra context.
"""
from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spikellm.checks import check_int
from spikellm.errors import ConfigError, DataError
from spikellm.nn.storage import trim_heap
from spikellm.progress import per_block, progress_bar

log = logging.getLogger(__name__)
LOGITS_BYTES = 256 << 20  # at most this much fp32 logits per forward (windows per batch are cut to fit)


@dataclass
class Perplexity:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    ppl: float
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    stride: int


def eval_windows(num_tokens: int, seqlen: int, stride: int | None) -> list[tuple[int, int, int]]:
    """``(start, end, first scored position within the window)`` of every window."""
    if stride is None or stride >= seqlen:
        return [(start, start + seqlen, 1) for start in range(0, num_tokens - seqlen + 1, seqlen)]
    windows, scored_until = [], 1  # position 0 is never predicted (no context)
    for start in range(0, num_tokens - 1, stride):
        end = min(start + seqlen, num_tokens)
        windows.append((start, end, max(1, scored_until - start)))
        scored_until = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Tensor, seqlen: int, stride: int | None = None, batch_size: int = 8,
               progress: bool = False) -> Perplexity:
    """Perplexity of ``model`` (input_ids ``[B, T]`` → logits) on the 1-D token ids ``tokens``."""
    check_int("seqlen", seqlen, 2)
    check_int("batch_size", batch_size, 1)
    if stride is not None:
        check_int("stride", stride, 1, seqlen)
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    if limit is not None and seqlen > limit:
        raise ConfigError("seqlen", seqlen, f"exceeds the model's max_seq_len={limit}; lower it")
    windows = eval_windows(len(tokens), seqlen, stride)
    if not windows:
        raise DataError(f"the evaluation text has {len(tokens)} tokens, fewer than one window of seqlen={seqlen}; "
                        "lower seqlen or use a longer split")
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(
        getattr(getattr(model, "config", None), "hf", None), "vocab_size", 0)
    fits = max(1, LOGITS_BYTES // max(1, seqlen * vocab * 4))
    if batch_size > fits:  # 8 windows of 2,048 tokens over 32,000 words are 2 GB of logits
        log.info("perplexity: %d windows per forward instead of %d (their logits would take %.1f GB)", fits,
                 batch_size, batch_size * seqlen * vocab * 4 / 1e9)
        batch_size = fits
    total_nll, total_tokens = 0.0, 0
    batches = range(0, len(windows), batch_size)
    with ExitStack() as stack:
        # the bar moves per decoder block: one batch of a billion-parameter model takes minutes
        blocks = _blocks_or_none(model)
        steps = len(blocks) if blocks else 1
        advance = stack.enter_context(progress_bar(f"perplexity, {len(windows)} windows of {seqlen}",
                                                   len(batches) * steps, enabled=progress))
        if blocks:
            # glibc keeps what a block's activations freed in its heap: a 1.1B model's eval grew by
            # 2 GB over a few batches without giving it back after each block
            def after_block(amount: float = 1.0) -> None:
                advance(amount)
                trim_heap()

            stack.enter_context(per_block(blocks, after_block))
        for first in batches:
            nll, count = _batch_nll(model, tokens, windows[first:first + batch_size], device)
            total_nll += nll
            total_tokens += count
            if not blocks:
                advance(1)
    return Perplexity(total_nll / total_tokens, math.exp(total_nll / total_tokens), total_tokens, len(windows),
                      seqlen, stride or seqlen)


def _blocks_or_none(model: nn.Module):
    from spikellm.models.spikify import decoder_blocks

    try:
        return decoder_blocks(model)
    except ConfigError:
        return None


def _batch_nll(model: nn.Module, tokens: Tensor, group: list, device) -> tuple[float, int]:
    """Summed NLL and scored tokens of one batch of windows."""
    length = max(end - start for start, end, _ in group)
    # short last windows (sliding mode) are right-padded; padding is never scored
    ids = torch.zeros(len(group), length, dtype=torch.long)
    scored = torch.zeros(len(group), length, dtype=torch.bool)
    for row, (start, end, from_position) in enumerate(group):
        ids[row, : end - start] = tokens[start:end]
        scored[row, from_position: end - start] = True
    ids, scored = ids.to(device), scored.to(device)
    logits = model(ids)
    total = 0.0
    # NLL = logsumexp − the target's logit, a few hundred positions at a time: no copy of the logits
    for row in range(len(group)):
        for start in range(0, length - 1, 256):
            end = min(start + 256, length - 1)
            chunk = logits[row, start:end].float()
            targets = ids[row, start + 1:end + 1]
            nll = torch.logsumexp(chunk, dim=-1) - chunk.gather(-1, targets[:, None]).squeeze(-1)
            total += nll[scored[row, start + 1:end + 1]].sum(dtype=torch.float64).item()
    return total, int(scored[:, 1:].sum())


def evaluation_text(dataset: str, seed: int = 0, val_fraction: float = 0.05) -> str:
    """The text a perplexity is measured on, by name or path.

    ``wikitext2``: the test split's rows joined with ``"\\n\\n"`` (GPTQ / OmniQuant); ``c4``: the
    first 1,100 documents of the validation shard joined with spaces (their ``c4`` protocol);
    ``pydoc``: the validation documents of the default training split (``seed``, ``val_fraction``),
    joined with ``"\\n\\n"``; otherwise a local file or directory of text, joined the same way.
    """
    from spikellm.data.corpus import hub_rows, load_documents
    from spikellm.data.datamodule import split_documents

    if dataset == "wikitext2":
        return "\n\n".join(hub_rows("wikitext2", "test"))
    if dataset == "c4":
        return " ".join(hub_rows("c4", "validation")[:1100])
    if dataset == "pydoc":
        return "\n\n".join(split_documents(load_documents("pydoc"), val_fraction, seed)[1])
    return "\n\n".join(load_documents("text", dataset))
