"""The fused CPU encoder: the collapsed form of a uniform-count encoder in one C pass per row.

One decoding step of a small model encodes a single token 4 times per block, and each encoding
in PyTorch is about ten small tensor operations whose dispatch costs far more than the 256-wide
arithmetic (~20 µs a call against ~3 µs here). :func:`fused_encode` computes the very same numbers
as the PyTorch path (:func:`encode_reference`, the library's own rounding) in one call.

The C source beside this file is compiled on first use with the system C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) into ``compiled/`` of the cache the data uses too (``$SPIKELLM_CACHE``,
else ``~/.cache/spikellm``), keyed by the source, the compiler, the flags and the platform, and
loaded with :mod:`ctypes`: no build step at install, ~0.2 s once per machine. Where it
cannot be built (no compiler, an unwritable cache), a warning says why, once, and the encoders
keep the PyTorch path, which gives the same numbers. ``SPIKELLM_CPU_ENCODER=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_encode.c")
# IEEE single precision one operation at a time: no fast-math, no fused multiply-add
FLAGS = ("-O3", "-std=c11", "-fno-fast-math", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared")
#: the fused path runs up to this many elements per call; beyond, PyTorch's vectorised and threaded
#: operations are faster than one C loop, and the dispatch it saves no longer matters
MAX_ELEMENTS = 1 << 15

_lock = threading.Lock()
_state: dict = {}  # "functions" (the loaded C functions, or None) and "reason" (why None)


def cache_dir() -> Path:
    """Where the compiled encoder is kept: ``compiled/`` in the cache the data uses too,
    ``$SPIKELLM_CACHE`` or else ``~/.cache/spikellm``."""
    return Path(os.environ.get("SPIKELLM_CACHE") or "~/.cache/spikellm").expanduser() / "compiled"


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CC`` (which may carry arguments, ``ccache gcc``), else the first
    of ``cc``, ``gcc``, ``clang`` on the PATH."""
    if os.environ.get("CC"):
        command = shlex.split(os.environ["CC"])
        found = shutil.which(command[0]) if command else None
        if found:
            return [found, *command[1:]]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def library_path(compiler: list[str]) -> Path:
    """The cached library of this source, compiler, flags and platform."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(compiler).encode(), " ".join(FLAGS).encode(),
                                     platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    return cache_dir() / f"cpu_encode-{key}.so"


class _CompileError(Exception):
    """The compiler refused the source (its last line of output says why)."""


def _build(compiler: list[str], target: Path) -> None:
    """Compile the source into ``target``, atomically: a half-written library is never loaded, and a
    process that has the old one loaded keeps its copy (it is replaced, never written in place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # a name of our own that the compiler creates, so the library gets the usual permissions
    partial = target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        done = subprocess.run([*compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise _CompileError(f"{' '.join(compiler)} failed: {last[0]}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _open(target: Path):
    library = ctypes.CDLL(str(target))
    pointer, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    rows, channels = library.spikellm_encode_rows, library.spikellm_encode_channels
    rows.argtypes = [pointer, i64, i64, pointer, i32, i32, f32, pointer, f32, f32, pointer, pointer]
    channels.argtypes = [pointer, i64, pointer, pointer, i32, f32, f32, f32, pointer]
    rows.restype = channels.restype = i32
    return rows, channels


def _load():
    """``(C functions, None)`` or ``(None, why not)``; built once per machine, loaded once per process.
    Nothing here may fail a run: every error becomes the reason."""
    if os.environ.get("SPIKELLM_CPU_ENCODER", "1") == "0":
        return None, "turned off by SPIKELLM_CPU_ENCODER=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    target = None
    try:
        target = library_path(compiler)
        if not target.exists():
            _build(compiler, target)
        try:
            return _open(target), None
        except (OSError, AttributeError):  # a damaged cached file (a full disk, a copied cache): build it again
            target.unlink(missing_ok=True)
            _build(compiler, target)
            return _open(target), None
    except _CompileError as error:
        return None, str(error)
    except (OSError, subprocess.SubprocessError) as error:
        where = "the cache" if target is None else target.parent
        return None, f"cannot build or load it in {where} ({error}); set SPIKELLM_CACHE to a writable directory"
    except Exception as error:  # e.g. no home directory to put the cache in
        return None, f"{type(error).__name__}: {error}"


def cpu_encoder():
    """The loaded C functions ``(rows, channels)``, or None (see :func:`unavailable_reason`); a
    warning says why, once."""
    if "functions" not in _state:
        with _lock:
            if "functions" not in _state:
                functions, reason = _load()
                if reason is not None and "SPIKELLM_CPU_ENCODER" not in reason:
                    log.warning("the fused CPU encoder is unavailable: %s. Encoders run the PyTorch path "
                                "(the same numbers, slower decoding)", reason)
                _state.update(functions=functions, reason=reason)
    return _state["functions"]


def unavailable_reason() -> str | None:
    """Why :func:`cpu_encoder` is None, or None when it is loaded."""
    cpu_encoder()
    return _state["reason"]


def reset() -> None:
    """Forget the loaded encoder, so the next call looks again (tests; a changed environment)."""
    with _lock:
        _state.clear()


def fused_encode(x: Tensor, levels: int, low, high, signed: bool = True, step: Tensor | None = None,
                 channel_scale: Tensor | None = None, want_counts: bool = False, want_step: bool = True):
    """``(value n·Δ, counts, step [..., 1])`` of ``x [..., K]`` (fp32, CPU), one C pass per row.

    ``step`` given (``[..., 1]``: a γ-quantile, mean or learned step the encoder computed): used as
    is; None: the per-token bound (``max |x|``, or ``max(x, 0)`` unsigned) over ``levels``.
    ``channel_scale [K]``: per-channel step multipliers m, so a channel uses ``Δ/m`` and the bounds
    ``m·low, m·high``. ``counts`` is None unless ``want_counts``, a computed ``step`` None when not
    ``want_step``. Equal, bit for bit, to :func:`encode_reference`. Requires the C encoder
    (:func:`cpu_encoder` not None) and a float32 CPU ``x``.
    """
    function = _functions()[0]
    _check_input("fused_encode", x)
    x = x.contiguous()
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    given = step is not None
    if given:
        step = step.to(torch.float32).expand(*x.shape[:-1], 1).contiguous()
    elif want_step:
        step = x.new_empty((*x.shape[:-1], 1))
    scale = None if channel_scale is None else channel_scale.to(torch.float32).contiguous()  # alive through the call
    value = torch.empty_like(x)
    counts = torch.empty_like(x) if want_counts else None
    if rows and cols:
        function(x.data_ptr(), rows, cols, None if step is None else step.data_ptr(), not given, signed, levels,
                 None if scale is None else scale.data_ptr(), low, high, None if counts is None else counts.data_ptr(),
                 value.data_ptr())
    return value, counts, step


def fused_encode_channels(x: Tensor, previous: Tensor | None, levels: int, low, high, signed: bool = True):
    """``(value n·Δ, bound)`` of one new token ``x [..., 1, C]`` (fp32, CPU) of a per-channel
    (causal) code whose running bound over the tokens before is ``previous [..., 1, C]`` (None: no
    token before): ``bound = max(previous, |x|)`` (``max(x, 0)`` unsigned), ``Δ = max(bound, 1e-8) /
    levels`` per channel. What a cached decoding step of spiking keys computes: the last row of the
    code over the whole sequence, equal bit for bit."""
    function = _functions()[1]
    _check_input("fused_encode_channels", x)
    if x.shape[-2] != 1:
        raise ValueError(f"fused_encode_channels encodes one token [..., 1, C], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    if previous is not None and not (previous.shape == x.shape and previous.is_contiguous()):
        previous = previous.to(torch.float32).expand_as(x).contiguous()  # a carried bound usually is already
    bound, value = torch.empty_like(x), torch.empty_like(x)
    function(x.data_ptr(), x.numel(), None if previous is None else previous.data_ptr(), bound.data_ptr(), signed,
             levels, low, high, value.data_ptr())
    return value, bound


def _functions():
    functions = cpu_encoder()
    if functions is None:
        raise RuntimeError(f"the fused CPU encoder is unavailable: {unavailable_reason()}")
    return functions


def _check_input(name: str, x: Tensor) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{name} takes a float32 CPU tensor, got {x.dtype} on {x.device}")


def absmax_encoder(levels: int, low: int, high: int, signed: bool = True):
    """``encode(x) -> n·Δ`` on the per-token bound over ``levels`` (no channel multipliers), the
    case every decoding step runs: :func:`fused_encode` with its arguments bound once, one Python
    frame and one allocation per call. ``x``: a contiguous float32 CPU tensor. None when the C
    encoder is unavailable."""
    functions = cpu_encoder()
    if functions is None:
        return None
    function = functions[0]
    # converted once: ctypes would convert the Python numbers again on every call
    levels_c, low_c, high_c, signed_c = (ctypes.c_float(levels), ctypes.c_float(low), ctypes.c_float(high),
                                         ctypes.c_int(int(signed)))

    def encode(x: Tensor) -> Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        value = torch.empty_like(x)
        cols = x.shape[-1]
        if cols:
            function(x.data_ptr(), x.numel() // cols, cols, None, 1, signed_c, levels_c, None, low_c, high_c, None,
                     value.data_ptr())
        return value

    return encode


def encode_reference(x: Tensor, levels: int, low, high, signed: bool = True, step: Tensor | None = None,
                     channel_scale: Tensor | None = None):
    """:func:`fused_encode` in PyTorch: the encoders' own arithmetic, ``(value, counts, step)``."""
    from spikellm.ops.rounding import quantize_counts

    x = x.float()
    if step is None:
        magnitude = x.abs() if signed else x.clamp_min(0)
        step = magnitude.amax(dim=-1, keepdim=True).clamp_min(1e-8) / levels
    element_step, lo, hi = step, low, high
    if channel_scale is not None:
        element_step, lo, hi = step / channel_scale, low * channel_scale, high * channel_scale
    counts = quantize_counts(x, element_step, lo, hi)
    return counts * element_step, counts, step
