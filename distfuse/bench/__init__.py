"""Benchmarks of the distfuse operators (``distfuse-bench``, ``python -m distfuse.bench``).

Modules: :mod:`.timing` (the one timing loop: CUDA events, L2 flush, CUDA graphs,
max over ranks of medians), :mod:`.results` (JSON / markdown / PNG files),
:mod:`.all_reduce`, :mod:`.matmul_all_reduce`, :mod:`.decoder_layer` (one module
per benchmark, each with ``run(ctx) -> OpResult``) and :mod:`.__main__` (the
launcher; :func:`launch` runs it from Python and returns the report).
"""


def launch(argv=None):
    """Run ``distfuse-bench`` with the given arguments; returns rank 0's report (see __main__.launch)."""
    from .__main__ import launch as _launch
    return _launch(argv)


__all__ = ["launch"]
