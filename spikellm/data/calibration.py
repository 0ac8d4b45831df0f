"""Calibration data for post-training conversion: random windows of a corpus's training tokens.

GPTQ, OmniQuant and SpikeLLM calibrate on 128 sequences of 2048 tokens drawn at random from the
training split of the corpus (WikiText2 or C4); :func:`calibration_samples` draws them the same way
from the token stream of any ``data`` group (:class:`~spikellm.data.TextDataModule.train_tokens`),
seeded, so a conversion is reproducible.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from spikellm.checks import check_int
from spikellm.errors import DataError


def calibration_samples(tokens: Tensor | np.ndarray, n_samples: int = 128, seq_len: int = 2048, seed: int = 0) -> Tensor:
    """``[n_samples, seq_len]`` LongTensor of windows starting at seeded random offsets of ``tokens``.

    ``tokens`` may be a tensor or a NumPy array (the data module's memory-mapped token file: only
    the windows drawn are read). Windows may overlap (as in GPTQ's loader) when the corpus is short, but each must fit: a
    corpus of fewer than ``seq_len + 1`` tokens is a DataError naming both fixes.
    """
    n_samples = check_int("n_samples", n_samples, 1)
    seq_len = check_int("seq_len", seq_len, 2)
    seed = check_int("seed", seed, 0)
    if tokens.ndim != 1:
        raise DataError(f"calibration needs a 1-D token stream, got shape {tuple(tokens.shape)}")
    available = len(tokens) - seq_len
    if available < 1:
        raise DataError(f"the calibration corpus has {len(tokens)} tokens, fewer than one window of "
                        f"convert.calibration.seq_len={seq_len} + 1; lower the seq_len or use a larger data group")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, available, (n_samples,), generator=generator)
    window = (lambda s: torch.as_tensor(tokens[s:s + seq_len]).long()) if isinstance(tokens, Tensor) else \
        (lambda s: torch.from_numpy(tokens[s:s + seq_len].astype(np.int64)))
    return torch.stack([window(start) for start in starts.tolist()])
