"""QMesh's benchmark harness (``scripts/bench``): one module per benchmark, plus shared helpers.

Benchmarks are not tests: they measure, print a table, and append a dated section to ``docs/BENCHMARKS.md``.
Every figure that depends on the machine is a ratio or difference against a baseline measured in the same run.
"""
