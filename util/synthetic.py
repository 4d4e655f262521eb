"""Moved to util/data/synthetic.py; this name stays importable until its last importers
(tests/test_faults.py, benchmarks/bench_train.py) import SyntheticShapes from util.data."""
from util.data.synthetic import PATTERNS, SyntheticShapes  # noqa: F401
