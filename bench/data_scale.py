"""Data pipeline at scale: peak memory and tokenization speed of ``train.py`` on
synthetic corpora of growing size, and how fast a second run (cache hit) starts training.

    OMP_NUM_THREADS=1 python bench/data_scale.py                  # 10, 100 and 1,000 MB
    OMP_NUM_THREADS=1 python bench/data_scale.py --sizes 10 100   # a subset
    OMP_NUM_THREADS=1 python bench/data_scale.py --splits         # data.train_path / data.val_path

Each corpus is text-like: words of a 30,000-word vocabulary drawn from a Zipf distribution
(s = 1.1), sentences of 4-24 words, paragraphs of 2-8 sentences; generated in blocks and
streamed to disk (seeded: the same bytes every time). For each size, ``train.py model=llama_micro
data=text data.path=<corpus> trainer.max_steps=3`` runs twice as a subprocess, with a fresh
``SPIKELLM_CACHE`` the first time (BPE training and tokenization) and the same cache the second
time (a cache hit). Reported per run: peak RSS of the process (``os.wait4``'s ``ru_maxrss``),
wall time, the tokens/s the pipeline logs for the train split, and the time from launch to
the first training step (when Lightning prints its model summary, as fit starts).

Targets: peak RSS at 1,000 MB <= 2 GB and within 1.5x of the 10 MB run's; the cached run
starts training in under 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB_WORDS = 30_000
ZIPF_S = 1.1
# Validation at the start would read the whole held-out 5% (50 MB of text at 1,000 MB): the
# benchmark is about the data pipeline, so two validation batches and no validation first.
TRAIN_ARGS = ["model=llama_micro", "data=text", "trainer.max_steps=3", "validate_at_start=false",
              "+trainer.limit_val_batches=2", "callbacks=none", "logger=csv", "+trainer.enable_progress_bar=true"]
TOKENS_LINE = re.compile(r"tokenized the train split: (\d+) tokens from ([\d.]+) MB in ([\d.]+) s \((\d+) tokens/s\)")
READY_LINE = re.compile(r"data ready in ([\d.]+) s")
BPE_LINE = re.compile(r"trained the BPE in ([\d.]+) s")
FIRST_STEP = "Trainable params"  # the model summary Lightning prints as fit starts, right before step 1


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """A text-like corpus of about ``megabytes`` MB (10^6 bytes), written block by block."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1 / np.arange(1, len(letters) + 1)
    lengths = rng.integers(2, 11, VOCAB_WORDS)
    vocab = np.array(["".join(rng.choice(letters, n, p=weights / weights.sum())) for n in lengths], dtype=object)
    cdf = np.cumsum(1 / np.arange(1, VOCAB_WORDS + 1) ** ZIPF_S)
    cdf /= cdf[-1]
    target, written = int(megabytes * 1e6), 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            n = 1 << 20
            words = vocab[np.searchsorted(cdf, rng.random(n))]
            seps = np.full(n, " ", dtype=object)
            sentence_ends = np.cumsum(rng.integers(4, 25, n // 4))
            sentence_ends = sentence_ends[sentence_ends < n] - 1
            seps[sentence_ends] = ". "
            picks = np.cumsum(rng.integers(2, 9, len(sentence_ends)))
            seps[sentence_ends[picks[picks < len(sentence_ends)]]] = ".\n\n"
            interleaved = np.empty(2 * n, dtype=object)
            interleaved[0::2], interleaved[1::2] = words, seps
            text = "".join(interleaved)[:target - written]
            f.write(text)
            written += len(text)  # ASCII: characters are bytes
    tmp.rename(path)


def run_train(args: list[str], cache: Path, run_dir: Path, threads: int) -> dict:
    """``train.py *args``: its peak RSS, wall time, logged tokens/s and time to the first step."""
    env = {**os.environ, "SPIKELLM_CACHE": str(cache), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, first_step = bytearray(), None

    def read():  # timestamps the output as it arrives: the progress bar marks the first step
        nonlocal first_step
        while chunk := process.stdout.read1(1 << 16):
            output.extend(chunk)
            if first_step is None and FIRST_STEP.encode() in output[-len(chunk) - 16:]:
                first_step = time.monotonic() - start

    reader = threading.Thread(target=read)
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - start
    reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"train.py failed ({process.returncode}):\n{text[-3000:]}")
    tokens, bpe, ready = TOKENS_LINE.search(text), BPE_LINE.search(text), READY_LINE.search(text)
    return {"bpe_s": float(bpe[1]) if bpe else None, "data_setup_s": float(ready[1]) if ready else None, "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "first_step_s": first_step,
            "train_tokens": int(tokens[1]) if tokens else None, "tokenize_s": float(tokens[3]) if tokens else None,
            "tokens_per_s": int(tokens[4]) if tokens else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 100, 1000], help="corpus sizes in MB")
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora, caches and runs go (default: a temp dir)")
    parser.add_argument("--splits", action="store_true", help="data.train_path/data.val_path (95%%/5%% files) "
                                                              "instead of data.path with data.val_fraction")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="spikellm-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs, work dir {workdir}", flush=True)
    results = []
    for size in args.sizes:
        corpus = workdir / f"corpus-{size:g}MB.txt"
        start = time.monotonic()
        if not corpus.exists():
            write_corpus(corpus, size)
        generated = time.monotonic() - start
        if args.splits:
            data = _split_files(corpus)
        else:
            data = [f"data.path={corpus}"]
        cache = workdir / f"cache-{size:g}MB"
        row = {"size_mb": size, "generate_s": generated}
        for attempt in ("first", "cached"):
            row[attempt] = run_train([*TRAIN_ARGS, *data], cache, workdir / f"run-{size:g}MB-{attempt}", threads)
            print(json.dumps({"size_mb": size, "run": attempt, **row[attempt]}), flush=True)
        results.append(row)
    print()
    print(f"| corpus | peak RSS, first run | BPE training | tokenization (train split) | whole first run | "
          f"peak RSS, cached run | cached run: data setup / launch to first step | whole cached run |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        first, cached = row["first"], row["cached"]
        rate = f"{first['tokens_per_s'] / 1e6:.2f} M tokens/s ({first['train_tokens'] / 1e6:.1f} M in " \
               f"{first['tokenize_s']:.0f} s)" if first["tokens_per_s"] else "n/a"
        bpe = _s(first["bpe_s"])
        print(f"| {row['size_mb']:g} MB | {first['peak_rss_mb']:,.0f} MB | {bpe} | {rate} | {first['wall_s']:.0f} s | "
              f"{cached['peak_rss_mb']:,.0f} MB | "
              f"{_s(cached['data_setup_s'])} / {_s(cached['first_step_s'])} | {cached['wall_s']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps({"omp_num_threads": threads, "cpus": os.cpu_count(), "results": results},
                                        indent=1))


def _split_files(corpus: Path) -> list[str]:
    """The corpus cut at a paragraph near 95% into train and validation files, for data.train_path/val_path."""
    train, val = corpus.with_suffix(".train.txt"), corpus.with_suffix(".val.txt")
    if not val.exists():
        size = corpus.stat().st_size
        with open(corpus, "rb") as f:
            f.seek(int(size * 0.95))
            cut = int(size * 0.95) + f.read(1 << 16).find(b"\n\n") + 2
        with open(corpus, "rb") as f, open(train, "wb") as out:
            for start in range(0, cut, 16 << 20):
                out.write(f.read(min(16 << 20, cut - start)))
            val.write_bytes(f.read())
    return [f"data.train_path={train}", f"data.val_path={val}"]


def _s(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
