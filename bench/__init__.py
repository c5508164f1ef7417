"""Benchmarks for cancellation and the session API: `make bench` (or `python -m bench`).

Each figure is measured against the real product (gunicorn web instances, `python -m workers` processes,
redis-server and the MongoDB-wire server on loopback) beside a baseline taken in the same run, printed as
a table and written as JSON under bench/results/.
"""
