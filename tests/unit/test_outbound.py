"""project/outbound.py: which addresses count as public, and which URLs are not http(s) at all."""

from __future__ import annotations

import pytest

from project import outbound


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT (shared address space)
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "::7f00:1",  # IPv4-compatible (deprecated, reserved)
    ],
)
def test_is_public_address__refuses_every_internal_kind(address):
    assert outbound.is_public_address(address) is False


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8"]
)
def test_is_public_address__accepts_global_unicast(address):
    assert outbound.is_public_address(address) is True


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.test/x",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/_x",
        "hooks.example.test/x",
        "http:///no-host",
        "http://user:pw@hooks.example.test/x",
        "http://hooks.example.test:99999/x",
    ],
)
def test_split_url__only_http_and_https_with_a_host(url):
    with pytest.raises(outbound.Refused):
        outbound.split_url(url)


def test_split_url__keeps_path_and_query_and_defaults_the_port():
    assert outbound.split_url("https://Hooks.Example.test/a/b?t=1") == (
        "https",
        "hooks.example.test",
        443,
        "/a/b?t=1",
    )
    assert outbound.split_url("http://[::1]:8080")[1:] == ("::1", 8080, "/")
