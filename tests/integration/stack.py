"""The multi-process stack lives in the package so benchmarks and the contract harness share it."""

from agentcloud_clone.devstack import Stack

__all__ = ["Stack"]
