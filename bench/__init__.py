"""cvgraph benchmarks: ratios measured in one run on the same inputs (``python -m bench.run``).

Each benchmark builds its inputs from the photos that scikit-learn and scikit-image ship
(nothing is downloaded) in a temporary directory, and reports the measured numbers, the
ratio or value, the target and pass/fail. Never part of the test suite's timing.
"""
