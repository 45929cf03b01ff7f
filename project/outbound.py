"""Outbound HTTP to a URL someone typed: resolve the host once, vet every address it resolves to, and
connect to the vetted address (no second DNS lookup that a rebinding resolver could answer differently).

Alert webhooks (monitoring/alerts.py, checked again at save time by schedules/services.py) may reach
public addresses only: loopback, link-local (the cloud metadata service at 169.254.169.254), private,
shared (100.64/10), multicast, unspecified and reserved ones are refused unless the URL's host is
listed in ALERT_WEBHOOK_ALLOWED_HOSTS. The LLM client (orchestrator/llm.py) has the opposite rule and
shares the pinned connection.

Messages name the host and the refused address, never the URL's path or query (a webhook's secret).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# NAT64 (RFC 6052): a gateway in the network translates these to the IPv4 address in their last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(ValueError):
    """A URL that may not be called; the message says why (no path or query in it)."""


class Unresolved(Refused):
    """The URL's host does not resolve (now): nothing to vet, nothing to call."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as in the URL, lower case (the Host header and the TLS server name)
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]  # every address the host resolved to, all vetted, in getaddrinfo's order

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP of a getaddrinfo answer (an IPv6 scope such as `%eth0` dropped)."""
    return ipaddress.ip_address(address.split("%", 1)[0])


def is_public_address(address: str) -> bool:
    """Whether `address` is a globally reachable unicast address. IPv6 forms that carry an IPv4
    address (IPv4-mapped, NAT64, 6to4) are judged by the IPv4 address too."""
    ip = ip_of(address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
        if ip.sixtofour is not None and not is_public_address(str(ip.sixtofour)):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path with query) of an http(s) URL; `Refused` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused("not a valid URL") from exc
    if parts.scheme not in ("http", "https"):
        raise Refused(f"only http and https URLs are allowed, not {parts.scheme or 'no scheme'!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise Refused("the URL has no host")
    if parts.username or parts.password:
        raise Refused("credentials in the URL are not allowed")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path


def addresses_of(host: str, port: int) -> list[str]:
    """Every address `host` resolves to now (one lookup); `Unresolved` when there is none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Unresolved(f"{host} does not resolve") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))  # getaddrinfo's order (RFC 6724)
    if not addresses:
        raise Unresolved(f"{host} does not resolve")
    return addresses


def public_target(url: str, *, allowed_hosts: Iterable[str], setting: str) -> Target:
    """Parse `url`, resolve its host and vet every address: all must be public unless the host is in
    `allowed_hosts` (named `setting` in the message). Raises `Refused` (or `Unresolved`)."""
    scheme, host, port, path = split_url(url)
    addresses = addresses_of(host, port)
    if host not in {name.strip().lower() for name in allowed_hosts}:
        for address in addresses:
            if not is_public_address(address):
                raise Refused(
                    f"{host} resolves to {address}, which is not a public address (loopback, private, "
                    f"link-local, multicast or reserved); list the host in {setting} to allow it"
                )
    return Target(scheme, host, port, path, tuple(addresses))


def webhook_target(url: str) -> Target:
    """Where an alert webhook may be called now: every address its host resolves to is public, or the
    host is in ALERT_WEBHOOK_ALLOWED_HOSTS."""
    from django.conf import settings

    return public_target(
        url, allowed_hosts=settings.ALERT_WEBHOOK_ALLOWED_HOSTS, setting="ALERT_WEBHOOK_ALLOWED_HOSTS"
    )


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted address while verifying the certificate for the host name (SNI too)."""

    def __init__(self, address: str, server_name: str, port: int, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(address, port, timeout=timeout, context=self.tls)
        self.server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)


def connection(scheme: str, address: str, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
    """An unopened connection to `address` (already vetted) for `host`; http.client follows no
    redirects. Every socket operation waits at most `timeout` seconds."""
    if scheme == "https":
        return PinnedHTTPSConnection(address, host, port, timeout)
    return http.client.HTTPConnection(address, port, timeout=timeout)


def open_connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    """A connected connection to the first of the target's vetted addresses that accepts one (each
    attempt waits at most `timeout`)."""
    error: OSError = OSError(f"{target.host}: no address")
    for address in target.addresses:
        conn = connection(target.scheme, address, target.host, target.port, timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            error = exc
            continue
        return conn
    raise error
