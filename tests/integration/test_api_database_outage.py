"""A request that finds PostgreSQL unreachable gets a 503 to retry, not a 500.

The outage is real: the test points the connection at a closed port for the length of one request.
"""

import socket

import pytest
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api__database_unreachable__answers_503_with_retry_after(api):
    port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = str(_closed_port())
    try:
        response = api.get("/api/schedules/")
    finally:
        connection.close()
        connection.settings_dict["PORT"] = port
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert "database" in response.json()["detail"]
