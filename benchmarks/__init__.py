"""Benchmarks of fastpatchdiv against the naive PyTorch reference (eager, torch.compile) and the peers.

``python -m benchmarks`` runs the default sweep (``--full``: every case; ``--quick``: the CI smoke run);
``pytest benchmarks/ --benchmark-only`` times the same cases with pytest-benchmark. See README.md.
"""
