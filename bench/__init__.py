"""Benchmarks (installed as ooc_universal.bench): every figure is a ratio against a
baseline measured in the same run, written as JSON."""
