"""A local-only client for OpenAI-compatible chat endpoints (docs/ARCHITECTURE.md, "Guardrails").

The endpoint guard resolves the host and refuses unless every address is loopback, private (RFC 1918,
IPv6 ULA) or link-local, or the host is named in `LLM_ALLOWED_HOSTS`. The check runs before any
connection, and the connection goes to the address that was checked (no second DNS lookup that a
rebinding resolver could answer differently). Redirects are never followed.

Nothing here logs or raises with prompt or response text: errors say what failed, never what was said.
Callers get the parsed content and the token counts; storing the text is theirs not to do.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from project import outbound

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
MAX_RESPONSE_BYTES = 1024 * 1024

_PRIVATE_NETS = tuple(
    ipaddress.ip_network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


class LLMError(Exception):
    """Base of the client's errors. Messages never contain prompt or response text."""


class LLMRefused(LLMError):
    """The endpoint is not local and not allowed: a configuration error, never retried."""


class LLMUnavailable(LLMError):
    """The endpoint could not be reached or answered unusably: callers degrade to no LLM."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the vetted IP the connection goes to


@dataclass(frozen=True)
class ChatResult:
    content: str
    prompt_tokens: int
    completion_tokens: int


def is_local_address(address: str) -> bool:
    ip = outbound.ip_of(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    return ip.is_loopback or ip.is_link_local or any(ip in net for net in _PRIVATE_NETS)


def resolve_endpoint(url: str, *, allowed_hosts: list[str] | tuple[str, ...] = ()) -> Endpoint:
    """Parse and vet `url`; return where to connect. Raises `LLMRefused` with the reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise LLMRefused(f"LLM endpoint refused: not an http(s) URL (scheme {parts.scheme!r})")
    host = (parts.hostname or "").lower()
    if not host:
        raise LLMRefused("LLM endpoint refused: no host in the URL")
    if parts.username or parts.password:
        raise LLMRefused("LLM endpoint refused: credentials in the URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise LLMRefused("LLM endpoint refused: invalid port") from exc
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise LLMUnavailable(f"LLM endpoint host {host!r} does not resolve") from exc
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise LLMUnavailable(f"LLM endpoint host {host!r} does not resolve")
    allowed = {name.lower() for name in allowed_hosts}
    if host not in allowed:
        public = [address for address in addresses if not is_local_address(address)]
        if public:
            raise LLMRefused(
                f"LLM endpoint refused: {host} resolves to non-local address {public[0]}; only loopback, "
                "private and link-local addresses are allowed unless the host is in LLM_ALLOWED_HOSTS"
            )
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.scheme, host, port, path, addresses[0])


def chat(
    endpoint: Endpoint,
    *,
    model: str,
    messages: list[dict[str, str]],
    timeout: float = DEFAULT_TIMEOUT,
) -> ChatResult:
    """One chat completion. Raises `LLMUnavailable` on any transport or protocol problem."""
    body = json.dumps({"model": model, "messages": messages, "temperature": 0}).encode()
    conn = outbound.connection(endpoint.scheme, endpoint.address, endpoint.host, endpoint.port, timeout)
    host_header = endpoint.host if ":" not in endpoint.host else f"[{endpoint.host}]"
    try:
        conn.request(
            "POST",
            endpoint.path,
            body=body,
            headers={
                "Host": f"{host_header}:{endpoint.port}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        response = conn.getresponse()
        # http.client never follows redirects; a redirect is an answer we do not use.
        if 300 <= response.status < 400:
            raise LLMUnavailable(f"LLM endpoint answered with a redirect ({response.status}); not followed")
        if response.status != 200:
            raise LLMUnavailable(f"LLM endpoint answered HTTP {response.status}")
        raw = response.read(MAX_RESPONSE_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise LLMUnavailable(f"LLM endpoint unreachable ({type(exc).__name__})") from None
    finally:
        conn.close()
    if len(raw) > MAX_RESPONSE_BYTES:
        raise LLMUnavailable("LLM response too large")
    try:
        data: Any = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
        usage = data.get("usage") or {}
        if not isinstance(content, str):
            raise TypeError
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise LLMUnavailable("LLM response is not an OpenAI-compatible chat completion") from None
    return ChatResult(
        content=content,
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
    )


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0
