"""What watches an encoder's forwards: one list per encoder (``encoder.observers``).

Three kinds of observer exist, each with one method, ``observe(encoder, forward)``:

* :class:`~spikellm.neurons.stats.SpikeStats` — full statistics with histograms (validation);
* :class:`~spikellm.neurons.tally.SpikeTally` — the few spike sums the energy counter reads;
* :class:`SpikeTerms` — differentiable spike counts that a spike objective sums into its loss.

A :class:`Forward` hands them one encoding; what several observers need (the spike sums) is
computed once for all of them, and once for every encoder that shares the spike train. An
observer attached or detached here also drops the encoder's fast-path plan (nothing may record
on the fused path).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from spikellm.neurons.tally import SpikeTally


class Term(NamedTuple):
    """One training forward's differentiable counts: spikes, non-zero inputs (or None), and activations."""

    spikes: Tensor
    nonzero: Tensor | None
    activations: int


class SpikeTerms(list):
    """The :class:`Term` of each training forward since the terms were taken; ``nonzero``: also
    the differentiable count of non-zero inputs (a non-zero target wants it)."""

    def __init__(self, nonzero: bool = False):
        super().__init__()
        self.nonzero = nonzero

    def observe(self, encoder, forward: "Forward") -> None:
        if forward.term is not None:
            self.append(Term(forward.term, forward.nonzero_term if self.nonzero else None, forward.counts.numel()))


def find(encoder, kind: type):
    """The encoder's observer of class ``kind``, or None."""
    return next((observer for observer in encoder.observers if isinstance(observer, kind)), None)


def attach(encoder, observer):
    """Attach ``observer`` in place of any of its class; returns it."""
    encoder.observers = [o for o in encoder.observers if not isinstance(o, type(observer))] + [observer]
    return observer


def detach(encoder, kind: type):
    """Detach the observer of class ``kind`` and return it (None when there was none)."""
    found = find(encoder, kind)
    if found is not None:
        encoder.observers = [o for o in encoder.observers if o is not found]
    return found


class Forward:
    """One encoding as its observers see it: counts, outlier counts, and what follows from them."""

    # what several observers need is computed on first use, once (no functools.cached_property:
    # its lock in Python 3.11 is a graph break under torch.compile)
    def __init__(self, encoder, counts: Tensor, outliers: Tensor | None, x: Tensor | None = None):
        self.encoder, self.counts, self.outliers = encoder, counts, outliers
        self._x = x  # the input, when a gradient is wanted (a spike term can then be made)
        self._found: dict = {}

    def _once(self, name: str, compute):
        if name not in self._found:
            self._found[name] = compute()
        return self._found[name]

    @property
    def _sums(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._once("sums", self._spike_sums)

    def _spike_sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(spikes, spikes per token, spikes per count)``: per-token sums first, exact in fp32
        while a row's spikes stay below 2^24."""
        counts, bound = self.counts, self.encoder.largest_count
        exact = torch.float32 if counts.dim() and counts.shape[-1] * bound < 2 ** 24 else torch.float64
        with torch.no_grad():
            per_count = self.encoder.spikes_per_count(counts)
            rows = per_count.sum(dim=-1, dtype=exact)
            return rows.sum(dtype=torch.float64), rows, per_count

    @property
    def spikes(self) -> Tensor:
        """The spike events of this encoding (a 0-d tensor)."""
        return self._sums[0]

    @property
    def tally(self) -> SpikeTally:
        return self._once("tally", self._tally)

    def _tally(self) -> SpikeTally:
        spikes, rows, per_count = self._sums
        counts, encoder = self.counts, self.encoder
        with torch.no_grad():
            # a count fires iff it is non-zero, and then at least one whole spike: min(spikes, 1) marks
            # the non-zero counts without a data-dependent branch (torch.count_nonzero on counts that
            # are zero about half the time runs ~8x slower than this sum on the CPU)
            marks = per_count.clamp_(max=1.0) if per_count.data_ptr() != counts.data_ptr() else per_count.clamp(max=1.0)
            nonzero = marks.sum(dtype=torch.float32 if counts.numel() < 2 ** 24 else torch.float64)
            # a binary or ternary spike carries 1: its levels are its spikes
            levels = encoder.spike_levels(counts).sum(dtype=torch.float64) if encoder.graded else spikes
            return SpikeTally.of(counts, self.outliers, spikes, levels, rows, nonzero)

    @property
    def nonzero_term(self) -> Tensor | None:
        """The non-zero inputs' count, differentiable (None without a gradient)."""
        if self._x is None:
            return None
        return self._once("nonzero", lambda: nonzero_term(self.encoder, self._x, self.counts, self._stepped))

    @property
    def term(self) -> Tensor | None:
        """The spike count, differentiable through the collapsed form (None without a gradient)."""
        if self._x is None:
            return None
        return self._once("term", lambda: spike_term(self.encoder, self._x, self.counts, self.spikes, self._stepped))

    @property
    def _stepped(self) -> tuple[Tensor, Tensor]:
        # one differentiable step for the spike term and the non-zero term
        return self._once("stepped", lambda: differentiable_step(self.encoder, self._x))


_recomputing = [False]


@contextlib.contextmanager
def recomputing():
    """A forward run again to recompute activations in backward (activation checkpointing): its
    encodings were observed the first time, so none is observed again. A spike term is still made,
    unrecorded: backward reads the tensors it saved, which the recomputation must produce again."""
    _recomputing[0] = True
    try:
        yield
    finally:
        _recomputing[0] = False


def observe(encoder, siblings, counts: Tensor, outliers: Tensor | None, x: Tensor | None = None) -> None:
    """Hand one encoding to the observers of ``encoder`` and of the ``siblings`` sharing its train;
    ``x`` when the forward wants a gradient (a spike objective's term needs it)."""
    listeners = [(e, o) for e in (encoder, *siblings) for o in e.observers]
    if not listeners:
        return
    forward = Forward(encoder, counts, outliers, x)
    if _recomputing[0]:
        for _, observer in listeners:
            if isinstance(observer, SpikeTerms):  # the same operations as the first time, recorded nowhere
                forward.term  # noqa: B018
                if observer.nonzero:
                    forward.nonzero_term  # noqa: B018
        return
    for listener, observer in listeners:
        observer.observe(listener, forward)


def differentiable_step(encoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(magnitude, step)``: what the step is taken of, and the per-token step (before any
    channel allocation) with its dependence on ``x`` and on a learned scale kept."""
    magnitude = encoder.magnitude(x)
    step = encoder._step_of(magnitude)
    if encoder.step_scale is not None:
        step = step * encoder.step_scale.abs().clamp_min(1e-4)
    return magnitude, step


def spike_term(encoder, x: Tensor, counts: Tensor, spikes: Tensor, stepped: tuple | None = None) -> Tensor:
    """The spike count of a forward, exactly ``spikes`` in value, differentiable through the
    collapsed form: the gradient is that of ``Σ spike_proxy(|x| / Δ)`` with Δ's dependence on
    ``x`` (its bound) and on the learned scale kept, and the rounding passed straight through.
    A learned scale is the per-layer threshold the objective pushes up; the task loss pulls it
    down. ``stepped``: :func:`differentiable_step` of ``x`` when already made."""
    magnitude, step = stepped or differentiable_step(encoder, x)
    slope = encoder.spike_proxy_slope
    if slope is not None and encoder.channel_scale is None and step.shape[-1] == 1:
        # a linear proxy of a per-token step: Σ_i |x_i| / Δ_t per token, without an element-wise
        # division (the clipping of the rare counts beyond the range is left out of the proxy)
        proxy = slope * (magnitude.sum(dim=-1, keepdim=True) / step).sum()
    else:
        if encoder.channel_scale is not None:
            step = step / encoder.channel_scale
        low, high = encoder.count_bounds()
        proxy = encoder.spike_proxy((x.float() / step).clamp(low, high).abs()).sum()
    return spikes + (proxy - proxy.detach())


def nonzero_term(encoder, x: Tensor, counts: Tensor, stepped: tuple | None = None) -> Tensor:
    """The count of non-zero inputs of a forward, exact in value, with the gradient of
    ``Σ min(1, |x| / (2 z Δ))``: ``z Δ`` is where a count leaves zero (``z = 1/2`` for rounding,
    the dead zone where one is set), so inputs below twice that are pushed toward zero (and the
    step, through its dependence on ``x`` and a learned scale, up); larger ones stay non-zero."""
    magnitude, step = stepped or differentiable_step(encoder, x)
    if encoder.channel_scale is not None:
        step = step / encoder.channel_scale
    edge = 2 * max(0.5, encoder.dead_zone)
    proxy = (magnitude / (edge * step)).clamp(max=1.0).sum()
    exact = (counts != 0).sum(dtype=torch.float64)
    return exact + (proxy - proxy.detach())
