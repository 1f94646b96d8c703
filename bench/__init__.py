"""podtrain benchmarks, reported as ratios against a plain-boto3 baseline measured in the same run.

``python -m bench`` (``make bench``) runs :mod:`bench.checkpoint`; ``python -m bench --help`` for options.
"""
