"""Benchmarks of feeder: ``python -m bench`` (or ``make bench``) prints one table.

Every figure is the median of several runs and is set against a baseline measured
in the same invocation (the machine is noisy): a floor (parsing or stat-ing the same
files), a bound (concurrency / latency), or a bare aiohttp handler.
"""
