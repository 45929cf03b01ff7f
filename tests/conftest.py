"""Shared fixtures: the real PostgreSQL (pytest-django's test database) and the real Redis."""

from __future__ import annotations

import pytest
import redis as redis_lib
from django.conf import settings
from rest_framework.test import APIClient


@pytest.fixture
def redis_client():
    """The test Redis database (REDIS_URL of project.settings_test), emptied before each test."""
    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice-123")


@pytest.fixture
def api(user):
    """An API client authenticated with a DRF token, as README's curl examples are."""
    from rest_framework.authtoken.models import Token

    token, _ = Token.objects.get_or_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def anon():
    return APIClient()


@pytest.fixture
def staff(django_user_model):
    """A test client logged in to the admin and the dashboard as a superuser."""
    from django.test import Client

    user = django_user_model.objects.create_superuser(
        username="root", password="pw-root-123", email="r@x.test"
    )
    client = Client()
    client.force_login(user)
    return client
