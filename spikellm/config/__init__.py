"""Configs to objects, by job: :mod:`~spikellm.config.build` (instantiate a group, with errors
naming the key), :mod:`~spikellm.config.trust` (what a file may name) and
:mod:`~spikellm.config.cli` (the command line, checked before Hydra runs, and the wrapper every
entry point shares; imported on demand)."""
from spikellm.config.build import (build, build_attention_encoder, build_model, build_neuron,  # noqa: F401
                                   check_arguments)
from spikellm.config.trust import TRUSTED_MODULES, check_trusted  # noqa: F401

__all__ = ["TRUSTED_MODULES", "build", "build_attention_encoder", "build_model", "build_neuron", "check_arguments",
           "check_trusted"]
