"""Side-by-side benchmarks of optaxclip against optax, PyTorch and the memory floor.

Run ``make bench`` (full sizes) or ``make bench-quick`` (small trees, under a
minute on a laptop CPU); see ``benchmarks/RESULTS.md`` for the latest tables.
"""
