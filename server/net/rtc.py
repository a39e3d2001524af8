"""aiortc glue: ICE settings for our peers, peer-connection construction, and which path a connection took.

aioice never offers loopback (127.0.0.1) candidates and aiortc's default configuration adds a public STUN
server. Both are wrong for a coordinator on a LAN or for tests in a loopback-only namespace, so the host
addresses ICE may use are an explicit setting (`--ice-host`), and so are the STUN/TURN servers: the coordinator's
`--ice-server` list travels to every node in the job description (the RTCIceServer dictionaries browsers take).
Never add a STUN/TURN server implicitly.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

log = logging.getLogger("swarmgrad.rtc")

_original_get_host_addresses = aioice.ice.get_host_addresses
_ice_hosts: tuple[str, ...] = ()
_relay_only = False

# RFC 7064/7065 URLs as browsers and aiortc both take them: scheme:host[:port][?transport=udp|tcp]. aiortc parses
# no IPv6 literal ([::1]), so a host is a name or an IPv4 address.
ICE_URL = re.compile(r"(?P<scheme>stun|turns?):(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?"
                     r"(?:\?transport=(?P<transport>[a-z]+))?")
TURN_TRANSPORTS = {"turn": ("udp", "tcp"), "turns": ("tcp",)}  # what aiortc can use (it skips turns over udp)
MAX_ICE_URLS = 16  # a job's list: enough for every provider's udp/tcp/tls variants
MAX_ICE_FIELD = 512  # characters in a URL, username or credential


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


def require_relay(relay_only: bool) -> None:
    """Make every peer connection of this process use TURN relay candidates only (`--ice-relay-only`), for
    networks where nothing else gets through. A process-wide setting, like restrict_ice_hosts: it holds for the
    link to the coordinator and for every other peer connection alike."""
    global _relay_only
    _relay_only = bool(relay_only)


def relay_required() -> bool:
    return _relay_only


# -- STUN/TURN servers ------------------------------------------------------------------------------------


def parse_ice_url(url: str) -> str:
    """`url` itself when it is a stun:, turn: or turns: URL that browsers and aiortc can both use; ValueError
    saying what is wrong otherwise."""
    if len(url) > MAX_ICE_FIELD:
        raise ValueError(f"an ICE server URL is at most {MAX_ICE_FIELD} characters")
    m = ICE_URL.fullmatch(url)
    if m is None:
        raise ValueError(f"{url!r} is not an ICE server URL: expected stun:HOST[:PORT], turn:HOST[:PORT]"
                         "[?transport=udp|tcp] or turns:HOST[:PORT][?transport=tcp] (HOST a name or an IPv4 "
                         "address; no user or password in the URL)")
    scheme, port, transport = m["scheme"], m["port"], m["transport"]
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"{url!r}: port {port} is not in 1..65535")
    if transport is not None and transport not in TURN_TRANSPORTS.get(scheme, ()):
        allowed = TURN_TRANSPORTS.get(scheme)
        raise ValueError(f"{url!r}: {scheme}: takes " + (f"transport={' or '.join(allowed)}" if allowed else
                                                          "no transport"))
    return url


def is_turn_url(url: str) -> bool:
    return url.startswith(("turn:", "turns:"))


def ice_server_list(urls: Iterable[str], username: str | None = None, credential: str | None = None) -> list[dict]:
    """The job's `ice_servers`: RTCIceServer dictionaries ({"urls", "username", "credential"}) exactly as
    RTCPeerConnection takes them. STUN URLs form one entry; TURN URLs another, with the one username and
    credential. ValueError when a URL is bad, when TURN URLs come without credentials or credentials without any."""
    urls = [parse_ice_url(u) for u in dict.fromkeys(urls)]
    if len(urls) > MAX_ICE_URLS:
        raise ValueError(f"at most {MAX_ICE_URLS} ICE server URLs")
    stun = [u for u in urls if not is_turn_url(u)]
    turn = [u for u in urls if is_turn_url(u)]
    if turn and (not username or not credential):
        raise ValueError("a turn: or turns: server needs a username and a password")
    if (username or credential) and not turn:
        raise ValueError("a TURN username or password was given, but no turn: or turns: server")
    for field in (username, credential):
        if field is not None and len(field) > MAX_ICE_FIELD:
            raise ValueError(f"a TURN username or password is at most {MAX_ICE_FIELD} characters")
    servers: list[dict] = []
    if stun:
        servers.append({"urls": stun})
    if turn:
        servers.append({"urls": turn, "username": username, "credential": credential})
    return servers


def public_ice_servers(servers: Iterable[dict]) -> list[dict]:
    """The same list without usernames and credentials, for views anyone may read (/api/status)."""
    return [{"urls": list(s["urls"])} for s in servers]


def rtc_ice_servers(described: object) -> tuple[RTCIceServer, ...]:
    """aiortc's RTCIceServer list from a job's `ice_servers` (absent or empty: none); ValueError when it is not a
    list of RTCIceServer dictionaries with URLs this module accepts."""
    if described is None:
        return ()
    if not isinstance(described, list) or len(described) > MAX_ICE_URLS:
        raise ValueError(f"ice_servers must be a list of at most {MAX_ICE_URLS} servers")
    servers = []
    for entry in described:
        if not isinstance(entry, dict):
            raise ValueError("each of ice_servers must be an object with urls")
        urls = entry.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise ValueError("each of ice_servers needs urls: a URL or a list of URLs")
        username, credential = entry.get("username"), entry.get("credential")
        if not all(f is None or (isinstance(f, str) and len(f) <= MAX_ICE_FIELD) for f in (username, credential)):
            raise ValueError(f"an ICE server's username and credential must be strings of at most {MAX_ICE_FIELD} "
                             "characters")
        servers.append(RTCIceServer([parse_ice_url(u) for u in urls], username=username, credential=credential))
    return tuple(servers)


def new_peer_connection(ice_servers: Sequence[RTCIceServer] = ()) -> RTCPeerConnection:
    """A peer connection using only `ice_servers` (none: host candidates only, see restrict_ice_hosts), and
    relay candidates only when require_relay is on. aiortc uses the first stun: and the first turn:/turns: URL
    it can; browsers use them all."""
    policy = RTCIceTransportPolicy.RELAY if _relay_only else RTCIceTransportPolicy.ALL
    return RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers), iceTransportPolicy=policy))


# -- the path a connection took ----------------------------------------------------------------------------


def selected_candidate_types(pc: RTCPeerConnection) -> tuple[str, str] | None:
    """(local, remote) candidate types ("host", "srflx", "prflx", "relay") of the pair ICE nominated for the data
    channel, or None while there is none. aiortc has no getSelectedCandidatePair, so this reads aioice's
    Connection under the channel's ICE transport (aiortc 1.x, aioice 0.x)."""
    sctp = pc.sctp
    if sctp is None:
        return None
    connection = getattr(sctp.transport.transport, "_connection", None)
    pair = getattr(connection, "_nominated", {}).get(1)  # the data channel's one component
    if pair is None:
        return None
    return pair.local_candidate.type, pair.remote_candidate.type


def link_path(pc: RTCPeerConnection) -> str:
    """"webrtc-relay" when the connection's selected pair goes through a TURN server at either end, else
    "webrtc". A remote relay candidate that the far end did not list in its SDP shows as peer-reflexive, so a
    relayed path is only seen as such when its candidate was signaled (our nodes send all of theirs)."""
    types = selected_candidate_types(pc)
    return "webrtc-relay" if types is not None and "relay" in types else "webrtc"
