"""Development harness: local servers, the multi-process stack, `make run` and `make contract`.

Not part of the product package: a production deployment runs `agentcloud_clone` and `workers` against its
own MongoDB and Redis. These modules start loopback servers and processes for development, tests and
benchmarks, and are run from a checkout (`python -m devtools.run`).
"""
