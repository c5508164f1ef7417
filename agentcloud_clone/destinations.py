"""Where a request to an address a team chose may go: webhook deliveries (services.webhooks) and an `openai`
app's upstream (services.apps, jobs.runners).

Never to loopback, private, link-local, shared or otherwise non-public addresses unless the operator allows it,
so that a team admin cannot reach the operator's own network from the workers. The check runs on the addresses
the name resolves to at the time, and the request then connects to one of those addresses (not to whatever the
name resolves to a moment later: DNS rebinding). An IPv6 address that carries an IPv4 one (IPv4-mapped, NAT64,
IPv4-compatible, 6to4, Teredo) counts as the IPv4 address it reaches.
"""

from __future__ import annotations

import ipaddress
import socket
import time

from .errors import InvalidInput

# A resolver that says "try again" (EAI_AGAIN: its upstream timed out, a blip) is asked again after these pauses
# (about a second in all) before the name counts as unresolvable; "no such name" is an answer, taken at once.
RESOLVE_PAUSES = (0.1, 0.3, 0.6)

# RFC 6052's well-known NAT64 prefix: a gateway forwards 64:ff9b::a.b.c.d to the IPv4 address a.b.c.d.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, for a network's own translators
IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765's ::ffff:0:a.b.c.d, for SIIT translators


def _inner_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to (none for a plain IPv6 address)."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if address in NAT64 or address in IPV4_TRANSLATED or int(address) >> 32 == 0:  # or IPv4-compatible (::1 too)
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def is_public(address: str) -> bool:
    """Whether a request to `address` (an IP address, with or without a `%zone`) reaches only the public
    Internet. (`ipaddress` calls NAT64's prefix global: the IPv4 address inside is what counts.)"""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL or ip.is_site_local:
            return False  # a network's own translators lead into that network; fec0::/10 is still routed locally
        inner = _inner_ipv4(ip)
        if inner:
            return all(a.is_global for a in inner)
    return ip.is_global


class UnresolvableHost(InvalidInput):
    """The host name does not resolve (here, now)."""


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to now, in the resolver's order (the one to try first first: RFC 6724 puts
    those this machine can reach ahead); UnresolvableHost when it does not resolve, after RESOLVE_PAUSES when the
    resolver only failed for the moment."""
    for pause in (*RESOLVE_PAUSES, None):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return list(dict.fromkeys(str(info[4][0]) for info in infos))
        except socket.gaierror as exc:
            if exc.errno != socket.EAI_AGAIN:
                break
            if pause is None:
                raise UnresolvableHost(
                    f"The host {host} could not be resolved just now (the name server did not answer); try again."
                ) from None
            time.sleep(pause)
        except (OSError, ValueError, UnicodeError):
            break
    raise UnresolvableHost(f"The host {host} cannot be resolved.")


def refuse_non_public(host: str, addresses: list[str], what: str, setting: str) -> None:
    """InvalidInput when any of `addresses` is not public: `what` (e.g. "webhooks") never go there unless the
    operator's `setting` allows it. The message does not say which address: a team admin must not learn the
    operator's internal names and addresses by trying them."""
    if not all(is_public(address) for address in addresses):
        raise InvalidInput(
            f"The host {host} resolves to an address that is not a public address; {what} never go to "
            f"loopback or private networks unless the operator allows it ({setting})."
        )
