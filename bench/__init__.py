"""voxswap benchmarks: what serving costs on top of the bare model, measured as ratios in one run.

``python -m bench.run`` runs every benchmark and writes ``docs/benchmarks.md``; ``--quick`` is the
smoke run the test suite uses to prove the harness works (its numbers mean nothing).
"""
