"""An independent PyTorch reference of SEAN, written from DESIGN.md (not from the JAX
code), used by ``tests/test_parity.py`` to check the JAX models numerically.

``modules``: the networks, the sampler and the losses in plain PyTorch (NCHW / NCDHW).
``convert``: copies weights and BatchNorm statistics between the JAX and torch models.
"""
