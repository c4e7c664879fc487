"""Benchmarks: one script per row of the targets in DESIGN.md, each measuring prefloop and its
baseline in the same run. `make bench` runs them all and writes docs/BENCHMARKS.md."""
