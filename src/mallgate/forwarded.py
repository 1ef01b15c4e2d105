"""Who the client is: the X-Forwarded-For rule, and the key its rate limits are counted under.

A proxy appends the address it saw to X-Forwarded-For; everything to the left of
that came from the client and may be made up. So the header is believed only when
the TCP peer is one of our proxies (`forwarded_allow_ips`), and then read from the
right: our own proxies are skipped and the first address that is not one of them
is the client. uvicorn's own handling is off (`serve` passes proxy_headers=False):
with '*' it takes the leftmost address, the one the client writes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# An IPv6 client usually holds a whole /64: counting per address would let it
# change address for every request.
IPV6_RATE_PREFIX = 64


def parse_networks(text: str) -> tuple[Network, ...]:
    """'10.0.0.0/8, 127.0.0.1, ::1' as networks; ValueError naming the entry that is not one."""
    if text.strip() == "":
        return ()
    networks = []
    for entry in (item.strip() for item in text.split(",")):
        if entry == "*":
            raise ValueError(
                "'*' would believe the X-Forwarded-For any client writes; "
                "list the IPs or CIDRs of your own proxies"
            )
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network ({exc})") from None
    return tuple(networks)


@lru_cache(maxsize=16)
def trusted_networks(text: str) -> tuple[Network, ...]:
    """The parsed setting, once per process (the settings validator has refused bad lists already)."""
    return parse_networks(text)


# Cached: every request parses its peer's address, nearly always one of a few (the proxies).
@lru_cache(maxsize=4096)
def parse_address(text: str) -> Address | None:
    """An address as a proxy writes it: bare, `1.2.3.4:port` or `[::1]:port`; None if it is not one."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=4096)
def _is_trusted(address: Address, trusted: tuple[Network, ...]) -> bool:
    return any(address in network for network in trusted)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: tuple[Network, ...]) -> str:
    """The client's address, given the TCP peer and every X-Forwarded-For header in order."""
    if not trusted:
        return peer
    believed = parse_address(peer)
    if believed is None or not _is_trusted(believed, trusted):
        return peer
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            # Past garbage nothing is reliable: the last hop we could name is the client.
            break
        believed = address
        if not _is_trusted(address, trusted):
            break
    return str(believed)


def rate_key(ip: str) -> str:
    """What per-IP limits count under: an IPv4 address as is, an IPv6 address as its /64."""
    address = parse_address(ip)
    if address is None:
        return ip[:64]
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_RATE_PREFIX), strict=False))
    return str(address)
