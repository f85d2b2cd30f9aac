"""Every URL the service reaches goes through here: expert weights (``download``) and webhook
callbacks (``post``).

A URL may name http or https only, in printable ASCII (no space, control or other character:
percent-encode them, and name an international domain by its ``xn--`` form); one that does not
parse is refused the same way, before any lookup. Its host is resolved, and every address it
resolves to must be public: loopback, private, link-local, shared, reserved, multicast and
unspecified addresses are refused, and so is an IPv6 address that carries such an IPv4 one
(IPv4-mapped, -compatible and -translated, NAT64, 6to4, Teredo: a gateway or tunnel would
deliver to the IPv4 address), unless ``T2V_ALLOW_PRIVATE_URLS`` allows them for tests and
closed networks. The connection then goes to the address that was checked, not to a second
lookup of the name (a name that resolves anew to an internal address cannot slip through),
with the name kept for the Host header and TLS. A download follows redirects by hand, each hop
checked the same way, at most ``MAX_REDIRECTS``; it has an overall deadline and a least rate
(after a grace period), and a size cap. A POST follows no redirect (its answer is the 3xx) and
waits at most its timeout for each step (connect, send, the answer's head).

What went wrong is logged; the error a caller sees says only that the URL could not be
fetched, or that it is not valid, or that its address or scheme is not allowed: reason
phrases, refused or closed ports and body bytes would make the service a port scanner of its
own network. A refused or invalid URL (``NotAllowedError``) is refused for good: a webhook
delivery to it is not tried again.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.services.problems import redact
from app.settings import Settings
from app.task2vec.errors import ConfigError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: What no URL holds: anything but printable ASCII (RFC 3986).
UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
#: IPv6 prefixes whose last 32 bits are an IPv4 address a gateway delivers to: NAT64's
#: well-known prefix, IPv4-compatible and IPv4-translated addresses.
IPV4_SUFFIXED = tuple(
    ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")
)
#: Not globally reachable, though Python's tables (before 3.12) call it global: NAT64 for
#: local use (RFC 8215), which may embed an IPv4 address anywhere in its last 80 bits.
LOCAL_USE = (ipaddress.IPv6Network("64:ff9b:1::/48"),)


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class OutboundError(ConfigError):
    """A URL that is not allowed, or that could not be fetched (the detail is in the log)."""


class NotAllowedError(OutboundError):
    """A URL refused before any connection: malformed, not http(s), or an internal address.
    Trying again does not change that (unless its name resolves elsewhere later)."""


def public(address: IPAddress) -> bool:
    """Whether an address is one the public internet routes (``is_global``), and no
    multicast; an IPv6 address that carries IPv4 ones (``embedded_ipv4``) is public only
    when they all are too, an IPv4-mapped one is judged by its IPv4 address alone."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return public(address.ipv4_mapped)
        if any(address in network for network in LOCAL_USE):
            return False
        if not all(public(inner) for inner in embedded_ipv4(address)):
            return False
    return address.is_global and not address.is_multicast


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, which a translator or tunnel on the path
    would deliver to: the last 32 bits of NAT64 (64:ff9b::/96), IPv4-compatible (::/96) and
    IPv4-translated (::ffff:0:0:0/96) addresses, the IPv4 address of a 6to4 one
    (2002::/16), the server and client of a Teredo one (2001::/32)."""
    found = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if any(address in network for network in IPV4_SUFFIXED):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


@dataclass(frozen=True)
class Policy:
    """How a URL may be fetched. ``allowed`` judges each resolved address (``public``, or
    every address with ``T2V_ALLOW_PRIVATE_URLS``)."""

    max_bytes: int
    deadline_seconds: float = 600.0
    min_bytes_per_second: float = 16 * 1024
    grace_seconds: float = 10.0
    allowed: Callable[[IPAddress], bool] = public

    @classmethod
    def of(cls, settings: Settings, max_bytes: int) -> Policy:
        return cls(
            max_bytes=max_bytes,
            deadline_seconds=settings.download_deadline_seconds,
            min_bytes_per_second=settings.download_min_bytes_per_second,
            allowed=allowed_by(settings),
        )


def allowed_by(settings: Settings) -> Callable[[IPAddress], bool]:
    """Which addresses the settings let the service reach: public ones, or any with
    ``T2V_ALLOW_PRIVATE_URLS``."""
    return _anywhere if settings.allow_private_urls else public


def _anywhere(_: IPAddress) -> bool:
    return True


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (a checked address) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    path: str


def shown(url: str) -> str:
    """A URL as errors and logs show it: no credentials, no query (of one that does not
    parse, what comes before its first ``?`` or ``#``)."""
    text = redact(url)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return re.split(r"[?#]", text, maxsplit=1)[0]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def check(url: str, policy: Policy) -> Target:
    """The URL resolved and judged, or ``OutboundError``."""
    if UNPRINTABLE.search(url):
        raise NotAllowedError(
            f"{shown(url)!r} is not a valid URL: it holds a space, a control or a non-ASCII "
            "character (percent-encode it; name an international domain by its xn-- form)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise NotAllowedError(f"{shown(url)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise NotAllowedError(f"{shown(url)!r}: only http and https URLs are fetched")
    host = parts.hostname
    if not host:
        raise NotAllowedError(f"{shown(url)!r} names no host")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError):  # no such name; a label too long (UnicodeError)
        log.info("outbound: %s does not resolve", host)
        raise OutboundError(f"{shown(url)!r} could not be fetched") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in found]
    if not addresses or not all(policy.allowed(a) for a in addresses):
        log.info("outbound: %s resolves to %s: refused", host, addresses)
        raise NotAllowedError(
            f"{shown(url)!r}: the host's address is not allowed (loopback, private, "
            "link-local, reserved or multicast; T2V_ALLOW_PRIVATE_URLS=true allows them on a "
            "closed network)"
        )
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return Target(url, parts.scheme, host, port, str(addresses[0]), path)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the URL's host name for SNI and certificates."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.target = target

    def connect(self) -> None:
        sock = socket.create_connection((self.target.address, self.port), self.timeout)
        context = ssl.create_default_context()
        self.sock = context.wrap_socket(sock, server_hostname=self.target.host)


def _connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPS(target, timeout)
    return http.client.HTTPConnection(target.address, target.port, timeout=timeout)


def download(url: str, out: Sink, policy: Policy) -> int:
    """Write the body at ``url`` to ``out``; the bytes written, or ``OutboundError``."""
    started = time.monotonic()
    for _ in range(MAX_REDIRECTS + 1):
        target = check(url, policy)
        left = policy.deadline_seconds - (time.monotonic() - started)
        # No byte for a grace period ends the download too (each read waits at most that).
        connection = _connection(target, timeout=max(0.1, min(policy.grace_seconds, left)))
        try:
            connection.request(
                "GET",
                target.path,
                headers={"Host": _host_header(target), "User-Agent": "task2vec-service"},
            )
            response = connection.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise _failed(url, f"redirect {response.status} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise _failed(url, f"status {response.status} {response.reason}")
            return _body(url, response, out, policy, started)
        except OSError as exc:  # refused, reset, timed out, TLS
            raise _failed(url, repr(exc)) from None
        except http.client.HTTPException as exc:
            raise _failed(url, repr(exc)) from None
        finally:
            connection.close()
    raise _failed(url, f"more than {MAX_REDIRECTS} redirects")


def post(url: str, body: bytes, headers: dict[str, str], policy: Policy) -> int:
    """POST ``body`` (JSON) to ``url``; the answer's status. The connection goes to the checked
    address; no redirect is followed; each step (connect, send, the answer's head) waits at
    most ``policy.deadline_seconds``; the answer's body is not read. ``NotAllowedError``
    for a refused URL, ``OutboundError`` when the host could not be reached or did not
    answer in time."""
    target = check(url, policy)
    connection = _connection(target, timeout=policy.deadline_seconds)
    sent = {
        **headers,
        "Host": _host_header(target),
        "User-Agent": "task2vec-service",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    try:
        connection.request("POST", target.path, body=body, headers=sent)
        return connection.getresponse().status
    except http.client.InvalidURL as exc:  # sending it again would fail the same way
        log.warning("outbound: %s could not be reached: %r", shown(url), exc)
        raise NotAllowedError(f"{shown(url)!r} is not a valid URL") from None
    except OSError as exc:  # refused, reset, timed out, TLS
        raise _failed(url, repr(exc), "reached") from None
    except http.client.HTTPException as exc:
        raise _failed(url, repr(exc), "reached") from None
    finally:
        connection.close()


def _host_header(target: Target) -> str:
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


def _body(
    url: str, response: http.client.HTTPResponse, out: Sink, policy: Policy, started: float
) -> int:
    total = 0
    body_started = time.monotonic()
    while chunk := response.read1(1 << 16):
        total += len(chunk)
        if total > policy.max_bytes:
            raise OutboundError(f"{shown(url)!r} holds more than {policy.max_bytes} bytes")
        out.write(chunk)
        now = time.monotonic()
        if now - started > policy.deadline_seconds:
            raise _failed(url, f"not done within {policy.deadline_seconds:g} s")
        reading = now - body_started
        if reading > policy.grace_seconds and total / reading < policy.min_bytes_per_second:
            raise _failed(url, f"{total / reading:.0f} bytes/s, under the least rate")
    return total


def _failed(url: str, why: str, verb: str = "fetched") -> OutboundError:
    log.warning("outbound: %s could not be %s: %s", shown(url), verb, why)
    return OutboundError(f"{shown(url)!r} could not be {verb}")
