"""Performance: model FLOPs (``flops``), ahead-of-time compilation for CPUs, GPUs and
TPUs (``targets``, ``aot``: ``python -m sean_jax.aot``), the steps both compile
(``steps``), and measuring on any backend (``measure``, ``benchmark``:
``python -m sean_jax.benchmark``)."""
