"""``python -m benchmarks --help``."""

from benchmarks.cli import main

if __name__ == "__main__":  # a forkserver child imports this module too; it must not rerun the sweep
    raise SystemExit(main())
