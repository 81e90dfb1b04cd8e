"""Benchmarks of omni-ray (issue #7): one script per benchmark, see docs/benchmarks.md."""
