"""Benchmarks and the in-process simulation: `wanps bench NAME` (docs/benchmarks.md)."""
