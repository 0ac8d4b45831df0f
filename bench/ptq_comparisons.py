"""The post-training comparisons (DESIGN.md), on a dense model trained here, through the user's path.

    python bench/ptq_comparisons.py --ckpt outputs/.../checkpoints/last.ckpt [--work /tmp/ptq] [--only gptq obs]

1. ``eval.py ckpt=<dense ckpt> export_hf=<work>/hf``: the trained LLaMA as a Hugging Face directory;
2. for every row below, ``train.py experiment=... model.hf_path=<work>/hf`` converts it and
   ``eval.py ckpt=<run>/spiking_model`` measures its pydoc perplexity (windows of 256 tokens).

Rows (calibration: 32 windows of 256 tokens of the pydoc training split):
- ``gptq``: int-b weights (b = 3, 2, per channel) with SDLLM's ternary spikes; RTN vs GPTQ;
- ``obs``: activations only (FP weights): uniform ternary steps vs Optimal Brain Spiking;
- ``block``: SpikeLLM W4A4 (GIF + OBS, int4 RTN weights) with and without block-wise calibration;
- ``ternary``: ternary weights (absmean rounding, GPTQ, GPTQ with salient GIF columns) and GIF spikes;
- ``sparsify``: activation thresholds under the 1.0005 loss tolerance;
- ``qat``: W4A4 ternary spikes before and after KL-distillation QAT.
Writes ``<work>/ptq_comparisons.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ["convert.calibration.n_samples=32", "convert.calibration.seq_len=256", "logger=none",
               "callbacks=none"]
W_NONE = "neuron.weight_quantizer=null"
ACTIVATIONS_ONLY = [W_NONE, "~convert.stages.gptq", "neuron.encoder.clip=null", "neuron.encoder.gamma=1.0"]
OBS = ["+convert.stages.obs._target_=spikellm.posttrain.OptimalBrainSpiking", "+convert.stages.obs.low_p=0.9",
       "+convert.stages.obs.addbit=1"]

ROWS = {
    "gptq": [
        ("W3 RTN", "sdllm_w4", ["neuron.weight_quantizer.bits=3", "~convert.stages.gptq"]),
        ("W3 GPTQ", "sdllm_w4", ["neuron.weight_quantizer.bits=3"]),
        ("W2 RTN", "sdllm_w4", ["neuron.weight_quantizer.bits=2", "~convert.stages.gptq"]),
        ("W2 GPTQ", "sdllm_w4", ["neuron.weight_quantizer.bits=2"]),
    ],
    "obs": [  # activations only: FP weights; ternary and GIF spikes of the same counts
        ("ternary 7 steps, uniform", "sdllm_w4", [*ACTIVATIONS_ONLY, "neuron.encoder.bits=4"]),
        ("ternary 15 steps, uniform", "sdllm_w4", [*ACTIVATIONS_ONLY, "neuron.encoder.bits=5"]),
        ("ternary 7-14 steps, OBS 10pct", "sdllm_w4", [*ACTIVATIONS_ONLY, "neuron.encoder.bits=4", *OBS]),
        ("ternary 7-14 steps, OBS 10pct, shared bound", "sdllm_w4",
         [*ACTIVATIONS_ONLY, "neuron.encoder.bits=4", *OBS, "+convert.stages.obs.separate=false"]),
        ("ternary 3-12 steps, OBS 44pct", "sdllm_w4", [*ACTIVATIONS_ONLY, "neuron.encoder.bits=3", OBS[0],
                                                       "+convert.stages.obs.low_p=0.5556", "+convert.stages.obs.addbit=2"]),
        ("GIF 3 steps, uniform", "spikellm_w4a4", [W_NONE, "~convert.stages.obs", "~convert.stages.block"]),
        ("GIF 5 steps, uniform", "spikellm_w4a4", [W_NONE, "~convert.stages.obs", "~convert.stages.block",
                                                   "neuron.encoder.bits=5"]),
        ("GIF 3-5 steps, OBS 10pct", "spikellm_w4a4", [W_NONE, "~convert.stages.block"]),
    ],
    "block": [
        ("W4A4 GIF+OBS, no calibration", "spikellm_w4a4", ["~convert.stages.block"]),
        ("W4A4 GIF+OBS, block calibration", "spikellm_w4a4", []),
    ],
    "ternary": [  # every linear layer additive: ternary weights, GIF spikes
        ("absmean ternary weights, no GPTQ", "spikellm_ternary",
         ["~convert.stages.gptq", "+neuron.weight_quantizer._target_=spikellm.quant.TernaryAbsMean",
          "+neuron.weight_quantizer._partial_=true"]),
        ("GPTQ ternary weights", "spikellm_ternary", ["convert.stages.gptq.grid.salient_fraction=0.0"]),
        ("GPTQ ternary GIF weights, 10pct salient columns x2", "spikellm_ternary", []),
    ],
    "sparsify": [
        ("sparsify (tolerance 1.0005)", "sparsify", []),
    ],
    "qat": [
        ("W4A4 ternary, no QAT", "hf_qat", ["~convert.stages.qat"]),
        ("W4A4 ternary, KL-distillation QAT", "hf_qat", ["convert.stages.qat.max_steps=200",
                                                         "trainer.val_check_interval=100"]),
    ],
}


def run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def evaluate(model_dir: Path, out: Path) -> dict:
    run("eval.py", f"ckpt={model_dir}", "perplexity.seqlen=256", f"hydra.run.dir={out}")
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a dense (neuron=none) train.py checkpoint")
    parser.add_argument("--work", default="/tmp/ptq_comparisons")
    parser.add_argument("--only", nargs="*", choices=sorted(ROWS), default=sorted(ROWS))
    args = parser.parse_args()
    work = Path(args.work)
    hf = work / "hf"
    results_path = work / "ptq_comparisons.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not hf.exists():
        run("eval.py", f"ckpt={args.ckpt}", f"export_hf={hf}", "perplexity.seqlen=256", f"hydra.run.dir={work / 'fp'}")
        results["floating point"] = {"ppl": json.loads((work / "fp" / "results.json").read_text())
                                     ["perplexity"]["pydoc"]["ppl"]}
    for group in args.only:
        results = {k: v for k, v in results.items() if not k.startswith(f"{group}: ")}  # rows of a rerun group
        for label, experiment, overrides in ROWS[group]:
            out = work / group / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)  # Hydra's override grammar: no ( , %
            if out.exists():
                import shutil

                shutil.rmtree(out)
            start = time.perf_counter()
            run("train.py", f"experiment={experiment}", f"model.hf_path={hf}", *CALIBRATION, *overrides,
                f"hydra.run.dir={out}")
            seconds = time.perf_counter() - start
            record = json.loads((out / "spiking_model" / "spikellm.json").read_text())
            evaluated = evaluate(out / "spiking_model", out / "eval")
            results[f"{group}: {label}"] = {
                "ppl": evaluated["perplexity"]["pydoc"]["ppl"], "experiment": experiment, "overrides": overrides,
                "convert_seconds": round(seconds, 1), "stages": record["stages"],
                "energy_ratio_to_dense": (evaluated.get("energy") or {}).get("ratio_to_dense"),
            }
            print(f"{group:9s} {label:36s} ppl {results[f'{group}: {label}']['ppl']:10.3f}", flush=True)
            results_path.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: round(v["ppl"], 3) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
