"""Which addresses count as public for requests whose address a team chose (webhooks, an app's upstream)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from agentcloud_clone import destinations
from agentcloud_clone.destinations import UnresolvableHost, is_public, resolve

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


def _resolver(monkeypatch: pytest.MonkeyPatch, failures: list[int]) -> list[str]:
    """getaddrinfo failing with each of `failures` (gaierror numbers) in turn, then answering 203.0.113.7; returns
    the names asked, one per call. No pauses."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        if failures:
            raise socket.gaierror(failures.pop(0), "resolver says no")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(destinations, "RESOLVE_PAUSES", (0.0,) * len(destinations.RESOLVE_PAUSES))
    return asked


def test_a_resolver_that_fails_for_the_moment_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _resolver(monkeypatch, [socket.EAI_AGAIN, socket.EAI_AGAIN])
    assert resolve("models.example", 443) == ["203.0.113.7"] and len(asked) == 3


def test_a_resolver_that_keeps_failing_for_the_moment_says_try_again(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _resolver(monkeypatch, [socket.EAI_AGAIN] * 10)
    with pytest.raises(UnresolvableHost, match=r"could not be resolved just now .*try again"):
        resolve("models.example", 443)
    assert len(asked) == len(destinations.RESOLVE_PAUSES) + 1


def test_a_name_that_does_not_exist_is_not_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _resolver(monkeypatch, [socket.EAI_NONAME])
    with pytest.raises(UnresolvableHost, match="cannot be resolved"):
        resolve("models.invalid", 443)
    assert asked == ["models.invalid"]
