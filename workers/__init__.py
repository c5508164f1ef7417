"""RQ worker processes for agentcloud_clone: `python -m workers [QUEUE...]`."""
