"""Benchmarks of fastpatchdiv against the naive PyTorch reference, eager and compiled.

``python -m benchmarks`` runs the sweep and writes ``benchmarks/results/<device>/``;
``pytest benchmarks/ --benchmark-only`` times the same cases with pytest-benchmark. See README.md.
"""
