"""A step-bounded run's progress bar read ``Epoch 0/-2``."""
from types import SimpleNamespace

from spikellm.training.progress import StepProgressBar


def describe(max_epochs):
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    return bar._get_train_description(0).strip()


def test_the_epoch_has_no_negative_limit():
    assert describe(-1) == "Epoch 0"
    assert describe(None) == "Epoch 0"
    assert describe(10) == "Epoch 0/9"
