"""The config tree, installed as package data (spikellm.conf): Hydra finds it as pkg://spikellm.conf."""
