"""Benchmarks: this layer against the other Channels layers and the raw transports.

Run ``python -m benchmarks --help``; ``docs/benchmarks.md`` explains the scenarios and
keeps the latest results. This is a measuring tool, not a test: nothing here asserts a
timing.
"""
