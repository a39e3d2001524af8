"""aiortc glue: ICE settings for our peers, and peer-connection construction.

aioice never offers loopback (127.0.0.1) candidates and aiortc's default configuration adds a public STUN
server. Both are wrong for a coordinator on a LAN or for tests in a loopback-only namespace, so the host
addresses ICE may use are an explicit setting (`--ice-host`). Never add a STUN/TURN server implicitly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection

_original_get_host_addresses = aioice.ice.get_host_addresses
_ice_hosts: tuple[str, ...] = ()


def restrict_ice_hosts(addresses: Sequence[str]) -> None:
    """Make ICE gather host candidates only on `addresses` (e.g. ["127.0.0.1"]); empty restores discovery.

    aioice has no option for this, so we replace its host-address discovery for the whole process; it is a
    process-wide setting because aioice reads it at gathering time for every connection.
    """
    global _ice_hosts
    hosts = tuple(str(ipaddress.ip_address(a)) for a in addresses)  # ValueError on a bad address
    _ice_hosts = hosts
    if hosts:
        def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
            return [h for h in hosts if (":" in h and use_ipv6) or (":" not in h and use_ipv4)]

        aioice.ice.get_host_addresses = get_host_addresses
    else:
        aioice.ice.get_host_addresses = _original_get_host_addresses


def ice_hosts() -> tuple[str, ...]:
    return _ice_hosts


def new_peer_connection() -> RTCPeerConnection:
    """A peer connection with no STUN/TURN servers: host candidates only (see restrict_ice_hosts)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))
