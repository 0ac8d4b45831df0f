"""Tensor math shared by the layers above, importing nothing of spikellm but its errors: exact
rounding and the straight-through gradient (:mod:`~spikellm.ops.rounding`), Hadamard rotations
(:mod:`~spikellm.ops.hadamard`)."""
