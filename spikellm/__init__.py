"""spikellm: spike-driven LLaMA-style language models (import-light: submodules load on use)."""
from spikellm.version import __version__

# registers spikellm's model directories with transformers' AutoConfig / AutoModelForCausalLM once
# transformers loads them (importing nothing of it here)
from spikellm.checkpoints.registration import register_when_imported as _register

_register()
del _register
