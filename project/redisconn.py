"""Every Redis client of the project comes from here: a plain Redis, or the master Redis Sentinel names.

With `REDIS_SENTINELS` (a comma-separated `host:port` list) and `REDIS_SENTINEL_MASTER` set, a client
asks the sentinels where the master is, and asks again whenever a connection fails (redis-py's
`Sentinel.master_for`): after a failover, every client, the long-lived ones included, reaches the
promoted replica on its next command. `REDIS_URL` then gives only the database number and the password;
its host and port are not used. The Celery broker follows the same convention: its default URL is
`sentinel://host:port/db;...` with the master's name in the transport options (project/settings.py).

Lua scripts survive a failover too: a script unknown to the new master (NOSCRIPT) is loaded again by
redis-py's `Script` on its next call.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

import redis
from redis.sentinel import Sentinel


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port` as a list of (host, port); the port defaults to 26379."""
    hosts = []
    for item in value.split(","):
        item = item.strip()
        if item:
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
            hosts.append((host, int(port)))
    return hosts


def sentinel_broker_url(redis_url: str, sentinels: str) -> str:
    """kombu's Sentinel form of the broker URL: one `sentinel://` address per sentinel, each carrying
    REDIS_URL's user, password and database number (the master's name goes in the transport options)."""
    parsed = urlparse(redis_url)
    userinfo, at, _ = parsed.netloc.rpartition("@")
    auth = f"{userinfo}{at}"
    path = parsed.path if parsed.path not in {"", "/"} else "/0"
    return ";".join(f"sentinel://{auth}{host}:{port}{path}" for host, port in parse_sentinels(sentinels))


def connect(url: str, *, sentinels: str = "", master: str = "", **options) -> redis.Redis:
    """A client for `url`, or for the master `sentinels` name (with `url`'s database and password).

    `options` are redis-py's connection options (socket timeouts, health_check_interval); the sentinels
    are asked with the same socket timeouts."""
    if not sentinels:
        return redis.Redis.from_url(url, **options)
    parsed = urlparse(url)
    db = int(parsed.path.strip("/") or 0) if parsed.scheme != "unix" else 0
    timeouts = {k: v for k, v in options.items() if k in {"socket_timeout", "socket_connect_timeout"}}
    return Sentinel(parse_sentinels(sentinels), sentinel_kwargs=timeouts, **timeouts).master_for(
        master,
        db=db,
        password=unquote(parsed.password) if parsed.password else None,
        username=unquote(parsed.username) if parsed.username else None,
        **options,
    )


def client(url: str | None = None, **options) -> redis.Redis:
    """A client for REDIS_URL, through the sentinels when REDIS_SENTINELS is set; or for `url` (the
    broker's): a `sentinel://` broker URL names REDIS_SENTINEL_MASTER through its own sentinels."""
    from django.conf import settings

    master = settings.REDIS_SENTINEL_MASTER
    if url is None:
        return connect(settings.REDIS_URL, sentinels=settings.REDIS_SENTINELS, master=master, **options)
    if not url.startswith("sentinel://"):
        return connect(url, **options)
    addresses = [urlparse(part) for part in url.split(";")]
    hosts = ",".join(f"{a.hostname}:{a.port or 26379}" for a in addresses)
    first = url.split(";")[0].replace("sentinel://", "redis://", 1)
    return connect(first, sentinels=hosts, master=master, **options)
