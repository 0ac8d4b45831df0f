"""The same converted model through spikellm's loader and through ``transformers``.

    OMP_NUM_THREADS=2 python bench/transformers_door.py --model DIR [--pairs 2] [--new 16] [--json PATH]

``DIR``: a converted model (e.g. ``bench/scale.py``'s 1.1B-shaped ``sdllm_w4-22l/spiking_model``). A
directory of an earlier format is first written again by ``SpikellmForCausalLM.save_pretrained``
(the upgrade a user runs) beside it, timed. Then, alternating ``--pairs`` times (A B A B ...), a
fresh process per run:

- ``spikellm``: ``load_model(DIR)`` then ``spikellm.generation.generate`` (greedy, ``--new`` tokens);
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(DIR)`` then ``model.generate`` (greedy).

Each run reports its peak RSS (``ru_maxrss``), load seconds, decode tokens/s (the tokens after the
first, timed by a streamer) and its tokens; the two doors must give the same tokens. Prints the
medians and ratios and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = r"""
import json, resource, sys, time, torch
door, directory, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
began = time.perf_counter()
if door == "spikellm":
    from spikellm.checkpoints import load_model
    from spikellm.generation import generate
    loaded = load_model(directory)
    model, tokenizer = loaded.model, loaded.tokenizer
else:
    import spikellm, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = model.spikellm_tokenizer
loaded_s = time.perf_counter() - began
prompt = tokenizer.encode("The built-in function len returns the number of items in a container")
marks = []
if door == "spikellm":
    result = generate(model, prompt, max_new_tokens=new, streamer=lambda _: marks.append(time.perf_counter()))
    tokens = result.tokens[0]
else:
    class Clock:
        def put(self, value):
            marks.append(time.perf_counter())
        def end(self):
            pass
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, streamer=Clock())
    tokens = out[0, len(prompt):].tolist()
    marks = marks[1:]  # the streamer also receives the prompt first
decode = (len(marks) - 1) / (marks[-1] - marks[0])
print(json.dumps({"door": door, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "load_s": loaded_s, "decode_tok_s": decode, "tokens": tokens}))
"""


def run(door: str, directory: Path, new: int) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, door, str(directory), str(new)], capture_output=True, text=True,
                          cwd=ROOT, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{door} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    directory, upgrade = args.model, None
    if json.loads((directory / "config.json").read_text()).get("model_type") != "spikellm":
        import spikellm  # noqa: F401
        from spikellm.checkpoints.hub import SpikellmForCausalLM

        began = time.perf_counter()
        target = directory.with_name(directory.name + "-v3")
        SpikellmForCausalLM.from_pretrained(directory).save_pretrained(target)
        old = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        upgrade = {"seconds": time.perf_counter() - began, "weights_bytes_before": old,
                   "weights_bytes_after": sum(f.stat().st_size for f in target.glob("*.safetensors"))}
        print(f"upgraded {directory} -> {target} in {upgrade['seconds']:.1f} s "
              f"(weights {old / 1e9:.3f} GB -> {upgrade['weights_bytes_after'] / 1e9:.3f} GB)", flush=True)
        directory = target
    runs = []
    for pair in range(args.pairs):
        for door in ("spikellm", "transformers"):
            runs.append(run(door, directory, args.new))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "tokens"}), flush=True)
    by_door = {door: [r for r in runs if r["door"] == door] for door in ("spikellm", "transformers")}
    same = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    pairs = list(zip(by_door["spikellm"], by_door["transformers"]))
    summary = {
        "model": str(directory), "pairs": args.pairs, "new_tokens": args.new, "same_tokens": same, "upgrade": upgrade,
        "median": {door: {key: statistics.median(r[key] for r in rows) for key in ("peak_rss_gb", "load_s",
                                                                                    "decode_tok_s")}
                   for door, rows in by_door.items()},
        "ratio_transformers_to_spikellm": {key: statistics.median(t[key] / s[key] for s, t in pairs)
                                           for key in ("peak_rss_gb", "load_s", "decode_tok_s")},
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
