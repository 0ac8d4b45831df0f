# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
DEMO_TASKS ?= tasks=[tiny_mc]
DEMO_PROMPT ?= The built-in function
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all clean

# torch pinned in the same pip command as everything else: a CPU build, never a CUDA one
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: train the spiking LLaMA under a spike budget (about one spike per activation),
# then evaluate its checkpoint (perplexity, zero-shot accuracy on the bundled local tasks,
# energy), let it write a short sample, and load its spiking checkpoint with transformers'
# AutoModelForCausalLM in a fresh interpreter. Each demo gets its own directory.
DEMO := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
demo: $(STAMP)
	$(BIN)/python train.py experiment=tiny_spike_budget hydra.run.dir=$(DEMO)
	$(BIN)/python eval.py ckpt=$(DEMO)/checkpoints/last.ckpt $(DEMO_TASKS) hydra.run.dir=$(DEMO)/eval
	$(BIN)/python generate.py ckpt=$(DEMO)/checkpoints/last.ckpt 'prompt="$(DEMO_PROMPT)"' max_new_tokens=48 hydra.run.dir=$(DEMO)/generate
	$(BIN)/python -c 'import sys, transformers; model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); print(f"transformers: AutoModelForCausalLM.from_pretrained(\"{sys.argv[1]}\", trust_remote_code=True) -> {type(model).__name__}, {model.num_parameters():,} parameters")' $(DEMO)/spiking_checkpoint

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
