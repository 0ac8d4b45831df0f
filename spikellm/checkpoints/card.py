"""The model card (``README.md``) of every model directory spikellm writes, as the Hugging Face Hub
reads it: YAML front matter (``library_name``, ``pipeline_tag``, tags, base model, datasets), then
the measured figures with their conditions, how the model was made, and how to load it.

The figures come from the ``card`` record a writer passes (:data:`CARD_KEYS` are read by name; any
other entry is listed as it is), so the card says only what a run measured.
"""
from __future__ import annotations

import json

import yaml

# card entries with a place of their own; writers fill those they measured
CARD_KEYS = {
    "perplexity": "validation perplexity", "corpus": "the corpus it was measured on",
    "spikes per activation": "spikes per encoded activation (all projections)",
    "energy per token (J)": "energy per token, spiking", "dense energy per token (J)": "the same, dense",
    "energy vs dense": "their ratio", "command": "the command that made the model",
    "base model": "the model a conversion started from",
}


def model_card(config: dict, name: str) -> str:
    """The README of a model directory named ``name`` whose ``config.json`` is ``config`` (a
    spiking checkpoint's, or a converted model's record with its ``hf_config``)."""
    card = dict(config.get("card") or {})
    layers = config.get("layers") or {}
    formats = sorted({str(layer.get("weight_format")) for layer in layers.values() if isinstance(layer, dict)})
    encoders = sorted({str(layer.get("encoder")) for layer in layers.values() if isinstance(layer, dict)})
    architecture = _architecture(config)
    neuron = (config.get("neuron") or {}).get("name")
    tags = ["spiking-neural-network", "spikellm", architecture.lower(), *(f for f in formats if f != "float")]
    if neuron:
        tags.append(f"neuron-{neuron}")
    front = {"library_name": "spikellm", "pipeline_tag": "text-generation", "tags": list(dict.fromkeys(tags))}
    if card.get("base model"):
        front["base_model"] = str(card["base model"])
    if card.get("corpus"):
        front["datasets"] = [str(card["corpus"])]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name}: a spiking {architecture}", "",
             "Every projection of this model is fed by spike trains, so its linear layers compute with additions "
             f"only; weights {', '.join(formats) or 'float'}. Written by spikellm "
             f"{config.get('spikellm_version', '')}.".replace(" .", "."), "",
             "## Measured", ""]
    lines += _figures(card, config.get("cost_model"))
    if card.get("command"):
        lines += ["", "## How it was made", "", "```bash", str(card["command"]), "```"]
    lines += ["", "## Load it", "", "```python",
              "import spikellm  # registers the model with transformers (or pass trust_remote_code=True)",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model, tokenizer = AutoModelForCausalLM.from_pretrained("{name}"), AutoTokenizer.from_pretrained("{name}")',
              "```", "",
              f"lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={name},trust_remote_code=True "
              "--tasks <tasks>`; spikellm: `python eval.py ckpt=<directory>`.", "",
              "## Architecture", "",
              f"- {architecture}: `{json.dumps(_architecture_fields(config), default=str)}`",
              f"- projection inputs: {', '.join(f'`{e}`' for e in encoders) or 'none'}",
              f"- cost model of the energy figures: {config.get('cost_model') or 'none recorded'}"]
    if config.get("thresholds"):
        lines.append(f"- activation-sparsity thresholds on {len(config['thresholds'])} projection inputs")
    return "\n".join(lines) + "\n"


def _figures(card: dict, cost_model) -> list[str]:
    rows = []
    if card.get("perplexity") is not None:
        where = f" on {card['corpus']}" if card.get("corpus") else ""
        rows.append(f"| perplexity | {card['perplexity']} | validation split{where} |")
    if card.get("spikes per activation") is not None:
        rows.append(f"| spikes per activation | {_number(card['spikes per activation'])} | every encoded projection "
                    "input, on the validation tokens |")
    if card.get("energy per token (J)") is not None:
        dense = card.get("dense energy per token (J)")
        beside = f"; dense {_microjoules(dense)}" if dense is not None else ""
        ratio = f", {card['energy vs dense']}× dense" if card.get("energy vs dense") is not None else ""
        rows.append(f"| energy per token | {_microjoules(card['energy per token (J)'])} | cost model "
                    f"`{cost_model or 'unnamed'}`{beside}{ratio} |")
    rows += [f"| {key} | {value} | |" for key, value in card.items() if key not in CARD_KEYS]
    if not rows:
        return ["No figures were recorded."]
    return ["| figure | value | conditions |", "|---|---|---|", *rows]


def _architecture(config: dict) -> str:
    if isinstance(config.get("hf_config"), dict):
        model_type = str(config["hf_config"].get("model_type", "model"))
        return {"llama": "LLaMA"}.get(model_type, model_type)
    target = (config.get("model") or {}).get("_target_", "")
    return {"LlamaConfig": "LLaMA", "MatMulFreeConfig": "MatMul-free LM"}.get(target.rsplit(".", 1)[-1], "model")


def _architecture_fields(config: dict) -> dict:
    if isinstance(config.get("hf_config"), dict):
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
        return {key: config["hf_config"][key] for key in keys if key in config["hf_config"]}
    return {k: v for k, v in (config.get("model") or {}).items() if k != "_target_"}


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _microjoules(joules) -> str:
    return f"{float(joules) * 1e6:.4g} µJ" if isinstance(joules, (int, float)) else str(joules)
