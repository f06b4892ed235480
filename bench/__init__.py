"""Benchmarks for the sidequest engine (not run by CI; run by hand).

.venv/bin/python -m bench.engine_bench [--only NAME[,NAME...]] [--n N]
"""
