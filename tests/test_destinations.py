"""Which addresses count as public for requests whose address a team chose (webhooks, an app's upstream)."""

from __future__ import annotations

import pytest

from agentcloud_clone.destinations import is_public

PUBLIC = ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]
NOT_PUBLIC = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT (shared)
    "169.254.169.254",  # link-local: a cloud's metadata service
    "0.0.0.0",
    "::1",
    "::",
    "fe80::1%eth0",
    "fc00::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::a00:1",  # NAT64 to 10.0.0.1 (`ipaddress` calls the prefix itself global)
    "64:ff9b:1::a00:1",  # a network's own NAT64 prefix
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "::ffff:0:a00:1",  # IPv4-translated (SIIT) to 10.0.0.1
    "fec0::1",  # site-local: deprecated, still routed on a local network
]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert is_public(address)


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_addresses_on_the_operators_side(address: str) -> None:
    assert not is_public(address)
