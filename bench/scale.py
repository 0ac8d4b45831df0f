"""Converting, storing and running a billion-parameter model on the CPU.

    OMP_NUM_THREADS=2 python bench/scale.py [--work DIR] [--threads 2] [--only convert eval generate]
                                            [--recipes sdllm_w4:22 sdllm_w4:4 spikellm_ternary:4 ...]
                                            [--pairs 2] [--new 32] [--json bench/scale.json]

1. Builds a model of TinyLlama-1.1B's shape (22 layers, dim 2048, ffn 5632, 32 / 4 heads, vocabulary
   32,000; random weights saved by ``save_pretrained(max_shard_size="500MB")`` in bf16 beside a
   local BPE: ``bench/scale_model.py``) and its 4-layer slice, under ``--work``.
2. Runs each conversion recipe as a user does (``train.py experiment=<recipe> model.hf_path=<dir>``
   with 8 × 512 calibration tokens and 2 validation batches of 512) and reads, per run: peak RSS
   (the kernel's own accounting of the finished process, ``wait4``) against the bf16 download's
   bytes, the output's bytes against the download's, the wall time, and GPTQ's per-block split
   (forward passes, Hessians, column loop) from the model's ``spikellm.json``.
3. ``eval.py`` on the converted 22-layer model (pydoc, windows of 512): peak RSS against the RSS
   right after loading (read when the loader logs ``loaded``).
4. ``generate.py`` (greedy, ``--new`` tokens) on the converted model and on the dense download,
   alternating ``--pairs`` times (A B A B ...): decode tokens/s as generate.py prints them, and the
   median of the pairs' ratios.
5. Extrapolates a LLaMA-2-7B conversion from the measured split (memory on the CPU and on one
   80 GB GPU, time per block by the operation counts) and prints it as an extrapolation.

Writes ``--json`` and prints tables. ``--only`` skips steps (their inputs must exist in --work).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from scale_model import TINYLLAMA, build_model_dir  # noqa: E402

CALIBRATION = ["convert.calibration.n_samples=8", "convert.calibration.seq_len=512", "data.block_size=512",
               "data.batch_size=1", "convert.eval_batches=2", "logger=none", "callbacks=none"]
RECIPE_OPTIONS = {  # what keeps a recipe's CPU run to minutes (the defaults are GPU-sized)
    "spikellm_w4a4": ["convert.stages.block.epochs=2", "+convert.stages.obs.samples=2"],
    "sparsify": ["convert.stages.sparsify.samples=1", "convert.stages.sparsify.keep=[0.5]"],
    "hf_qat": ["convert.stages.qat.max_steps=2", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1"],
}
PROMPT = "The built-in function"


def rss_of(pid: int) -> int:
    """Resident bytes of a running process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(script: str, args: list[str], threads: int, log: Path) -> dict:
    """Run ``python <script> <args>``: wall seconds, peak RSS (wait4), the RSS when the loader said
    ``loaded`` (steady), and its output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    steady, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if steady is None and "spikellm.checkpoints.loader: loaded" in line:
            steady = rss_of(process.pid)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    log.write_text("".join(lines))
    if status != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed (status {status}); see {log}")
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "steady_rss": steady, "output": "".join(lines)}


def download_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def convert(work: Path, recipe: str, layers: int, threads: int) -> dict:
    source = work / f"tinyllama-{layers}l"
    out = work / "runs" / f"{recipe}-{layers}l"
    if not (out / "spiking_model").is_dir():
        if out.exists():
            import shutil

            shutil.rmtree(out)
        args = [f"experiment={recipe}", f"model.hf_path={source}", *CALIBRATION, *RECIPE_OPTIONS.get(recipe, []),
                f"hydra.run.dir={out}"]
        measured = run("train.py", args, threads, work / f"convert-{recipe}-{layers}l.log")
        (out / "measured.json").write_text(json.dumps({k: v for k, v in measured.items() if k != "output"}))
    measured = json.loads((out / "measured.json").read_text())
    record = json.loads((out / "spiking_model" / "spikellm.json").read_text())
    downloaded = download_bytes(source)
    written = sum(p.stat().st_size for p in (out / "spiking_model").glob("model*.safetensors"))
    row = {"recipe": recipe, "layers": layers, "download_bytes": downloaded, "output_bytes": written,
           "output_over_download": written / downloaded, "peak_rss": measured["peak_rss"],
           "peak_over_download": measured["peak_rss"] / downloaded, "wall_s": measured["wall_s"],
           "stages": {name: {k: v for k, v in summary.items() if k != "per_block"}
                      for name, summary in record["stages"].items()},
           "model_dir": str(out / "spiking_model")}
    gptq = record["stages"].get("gptq")
    if gptq:
        row["gptq_per_block"] = gptq["per_block"]
        row["gptq_over_forward"] = gptq["time_over_forward"]
    return row


def evaluate(work: Path, model_dir: str, threads: int) -> dict:
    out = work / "runs" / "eval-22l"
    measured = run("eval.py", [f"ckpt={model_dir}", "perplexity.seqlen=512", "perplexity.batch_size=1",
                               f"hydra.run.dir={out}"], threads, work / "eval-22l.log")
    ppl = json.loads((out / "results.json").read_text())["perplexity"]["pydoc"]
    return {"peak_rss": measured["peak_rss"], "steady_rss": measured["steady_rss"],
            "peak_over_steady": measured["peak_rss"] / measured["steady_rss"], "ppl": ppl["ppl"],
            "windows": ppl["windows"], "wall_s": measured["wall_s"]}


def tokens_per_second(output: str) -> float:
    found = re.search(r"(\d+) tokens at ([\d.,]+) tokens/s", output)
    if not found:
        raise SystemExit(f"generate.py printed no speed:\n{output[-2000:]}")
    return float(found.group(2).replace(",", ""))


def generation(work: Path, converted: str, dense: Path, threads: int, pairs: int, new: int) -> dict:
    common = [f"prompt={PROMPT!r}".replace("'", '"'), f"max_new_tokens={new}", "temperature=0"]
    runs = {"converted": [], "dense": []}
    ratios = []
    for index in range(pairs):
        order = [("converted", converted), ("dense", dense)] if index % 2 == 0 else [("dense", dense),
                                                                                     ("converted", converted)]
        speeds = {}
        for name, ckpt in order:
            measured = run("generate.py", [f"ckpt={ckpt}", *common, f"hydra.run.dir={work / 'runs' / f'gen-{name}'}"],
                           threads, work / f"generate-{name}-{index}.log")
            speeds[name] = tokens_per_second(measured["output"])
            runs[name].append({"tokens_per_s": speeds[name], "peak_rss": measured["peak_rss"],
                               "steady_rss": measured["steady_rss"], "wall_s": measured["wall_s"]})
        ratios.append(speeds["converted"] / speeds["dense"])
    return {"pairs": pairs, "new_tokens": new, "runs": runs, "ratios": ratios,
            "converted_over_dense": statistics.median(ratios),
            "peak_over_steady": max(r["peak_rss"] / r["steady_rss"] for r in runs["converted"])}


# ---- the 7B extrapolation -------------------------------------------------------------------------

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)


def block_counts(shape: dict, tokens: int) -> dict:
    """What one block's GPTQ does, in operations: the two forward passes over the calibration
    tokens, the Hessians (one per distinct input: q/k/v, o, gate/up, down), the column loop (lazy
    updates ~ out·in² per projection) and the inversions (~4/3·in³ per distinct input)."""
    d, f = shape["hidden_size"], shape["intermediate_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    projections = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]  # (out, in)
    params = sum(o * i for o, i in projections)
    distinct_inputs = [d, d, d, f]
    return {"params": params,
            "forward": 2 * 2 * tokens * params,
            "hessian": sum(2 * tokens * i * i for i in distinct_inputs),
            "quantize": sum(o * i * i for o, i in projections) + sum(4 / 3 * i ** 3 for i in distinct_inputs),
            "hessian_bytes": sum(4 * i * i for i in distinct_inputs), "largest_input": max(distinct_inputs)}


def extrapolate(measured_22: dict, eval_row: dict | None, tokens: int = 4096) -> dict:
    """LLaMA-2-7B from the 1.1B run: per-block seconds scaled by operation counts, memory from the
    same accounting the 1.1B run is checked against."""
    small, large = block_counts(TINYLLAMA, tokens), block_counts(LLAMA2_7B, tokens)
    per_block = measured_22["gptq_per_block"]
    seconds = {key: statistics.median(block[f"{key}_s"] for block in per_block) for key in ("forward", "hessian",
                                                                                            "quantize")}
    scaled = {key: seconds[key] * large[key] / small[key] for key in seconds}
    layers_7b = LLAMA2_7B["num_hidden_layers"]
    embed_7b = 2 * LLAMA2_7B["vocab_size"] * LLAMA2_7B["hidden_size"]  # embeddings + head, bf16: 2 bytes each
    packed_7b = layers_7b * large["params"] * 0.5  # int4
    embed_1b = 2 * TINYLLAMA["vocab_size"] * TINYLLAMA["hidden_size"]
    packed_1b = TINYLLAMA["num_hidden_layers"] * small["params"] * 0.5
    # what the 1.1B run held beyond embeddings (bf16) and its packed blocks: the process, the
    # data, and one block's working set; the working set scales with a block's fp32 bytes and
    # its Hessians and inversion (2 × the widest input's Hessian), the rest does not
    fixed_and_block = measured_22["peak_rss"] - 2 * embed_1b - packed_1b
    block_1b = 4 * small["params"] + small["hessian_bytes"] + 2 * 4 * small["largest_input"] ** 2
    block_7b = 4 * large["params"] + large["hessian_bytes"] + 2 * 4 * large["largest_input"] ** 2
    process = max(fixed_and_block - block_1b, 0)
    cpu_peak = process + 2 * embed_7b + packed_7b + block_7b
    gpu_peak = block_7b + 2 * 4 * tokens * LLAMA2_7B["hidden_size"]  # a block, its Hessians and both hidden sets
    return {"extrapolation": True, "source": "the 22-layer 1.1B run of this bench, scaled by operation counts",
            "per_block_seconds": {k: round(v, 1) for k, v in scaled.items()},
            "seconds": round(layers_7b * sum(scaled.values()), 0),
            "cpu_peak_bytes": cpu_peak, "gpu_peak_bytes": gpu_peak, "gpu_host_bytes": process + 2 * embed_7b + packed_7b,
            "download_bytes": 2 * (layers_7b * large["params"] + embed_7b),
            "output_bytes": 2 * embed_7b + packed_7b}


def gigabytes(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("SPIKELLM_CACHE", "~/.cache/spikellm"))
                        .expanduser() / "bench" / "scale")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=["convert", "eval", "generate"])
    parser.add_argument("--recipes", nargs="+", default=["sdllm_w4:22", "sdllm_w4:4", "spikellm_ternary:4"])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "scale.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for layers in {int(r.split(":")[1]) for r in args.recipes} | {22}:
        build_model_dir(args.work / f"tinyllama-{layers}l", layers)
    results = {"threads": args.threads, "torch_threads_env": os.environ.get("OMP_NUM_THREADS"), "conversions": []}
    if "convert" in args.only:
        for item in args.recipes:
            recipe, layers = item.split(":")
            row = convert(args.work, recipe, int(layers), args.threads)
            results["conversions"].append(row)
            print(f"{recipe} on {layers} layers: peak RSS {gigabytes(row['peak_rss'])} = "
                  f"{row['peak_over_download']:.2f}× the bf16 download ({gigabytes(row['download_bytes'])}); output "
                  f"{gigabytes(row['output_bytes'])} = {row['output_over_download']:.3f}× the download; "
                  f"{row['wall_s']:.0f} s" + (f"; GPTQ {row['gptq_over_forward']:.2f}× its forward passes"
                                             if "gptq_over_forward" in row else ""), flush=True)
    main_row = next((r for r in results["conversions"] if r["recipe"] == "sdllm_w4" and r["layers"] == 22), None)
    model_dir = main_row["model_dir"] if main_row else str(args.work / "runs" / "sdllm_w4-22l" / "spiking_model")
    if "eval" in args.only:
        results["eval"] = evaluate(args.work, model_dir, args.threads)
        print(f"eval.py on the converted 1.1B: peak RSS {gigabytes(results['eval']['peak_rss'])} = "
              f"{results['eval']['peak_over_steady']:.3f}× the RSS after loading "
              f"({gigabytes(results['eval']['steady_rss'])}); ppl {results['eval']['ppl']:.1f}", flush=True)
    if "generate" in args.only:
        results["generate"] = generation(args.work, model_dir, args.work / "tinyllama-22l", args.threads, args.pairs,
                                         args.new)
        g = results["generate"]
        print(f"decode, converted / dense: {g['converted_over_dense']:.3f} (pairs: "
              f"{', '.join(f'{r:.3f}' for r in g['ratios'])}); converted "
              f"{statistics.median(r['tokens_per_s'] for r in g['runs']['converted']):.3f} tokens/s, dense "
              f"{statistics.median(r['tokens_per_s'] for r in g['runs']['dense']):.3f}; generate.py peak RSS "
              f"{g['peak_over_steady']:.3f}× the RSS after loading", flush=True)
    if main_row:
        results["llama2_7b"] = extrapolate(main_row, results.get("eval"))
        e = results["llama2_7b"]
        print(f"EXTRAPOLATION, LLaMA-2-7B sdllm_w4 (8 × 512 calibration tokens): {e['seconds'] / 60:.0f} min on this "
              f"CPU ({e['per_block_seconds']} s per block); peak RSS {gigabytes(e['cpu_peak_bytes'])} against a "
              f"{gigabytes(e['download_bytes'])} bf16 download; on one 80 GB GPU: {gigabytes(e['gpu_peak_bytes'])} of "
              f"GPU memory, {gigabytes(e['gpu_host_bytes'])} on the host; output {gigabytes(e['output_bytes'])}")
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
