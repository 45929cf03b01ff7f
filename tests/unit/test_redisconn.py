"""project/redisconn.py: the sentinel list, the broker's sentinel:// URL, the client each setting gives."""

from __future__ import annotations

import redis
from redis.sentinel import SentinelConnectionPool

from project.redisconn import client, connect, parse_sentinels, sentinel_broker_url


def test_parse_sentinels__host_port_list_with_the_default_port():
    assert parse_sentinels(" s1:26380, s2 ,10.0.0.3:5000,") == [
        ("s1", 26380),
        ("s2", 26379),
        ("10.0.0.3", 5000),
    ]


def test_sentinel_broker_url__one_address_per_sentinel_with_the_database_and_password():
    url = sentinel_broker_url("redis://:pw@ignored:6379/8", "s1:26379,s2:26380")
    assert url == "sentinel://:pw@s1:26379/8;sentinel://:pw@s2:26380/8"
    assert sentinel_broker_url("redis://ignored", "s1:1") == "sentinel://s1:1/0"
    assert sentinel_broker_url("redis://u:p%40w@ignored/2", "s1:1") == "sentinel://u:p%40w@s1:1/2"


def test_connect__without_sentinels_is_the_url_itself():
    conn = connect("redis://127.0.0.1:6390/3", socket_timeout=2)
    assert not isinstance(conn.connection_pool, SentinelConnectionPool)
    assert conn.connection_pool.connection_kwargs["db"] == 3


def test_connect__with_sentinels_asks_them_for_the_named_master_with_the_urls_database():
    conn = connect("redis://:p%40w@ignored:1/5", sentinels="s1:26379,s2:26380", master="cb", socket_timeout=2)
    pool = conn.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "cb"
    assert pool.connection_kwargs["db"] == 5
    assert pool.connection_kwargs["password"] == "p@w"  # percent-decoded, as Redis.from_url does


def test_client__a_sentinel_broker_url_names_the_configured_master(settings):
    settings.REDIS_SENTINEL_MASTER = "cb"
    conn = client("sentinel://s1:26379/4;sentinel://s2:26380/4", socket_timeout=2)
    assert conn.connection_pool.service_name == "cb"
    assert conn.connection_pool.connection_kwargs["db"] == 4
    assert isinstance(client("redis://127.0.0.1:6390/2"), redis.Redis)


def test_client__redis_url_goes_through_the_sentinels_when_they_are_set(settings):
    settings.REDIS_SENTINELS, settings.REDIS_SENTINEL_MASTER = "s1:26379", "cb"
    settings.REDIS_URL = "redis://ignored:6379/7"
    pool = client(socket_timeout=2).connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"]) == ("cb", 7)
    settings.REDIS_SENTINELS = ""
    assert not isinstance(client().connection_pool, SentinelConnectionPool)
