"""Read-only access: users in the `viewers` group read everything and write nothing.

One DRF permission, set as the default for every API view (project/settings.py), so an endpoint added
tomorrow is covered without anyone remembering to add it; the dashboard and /metrics ask the same
question through `is_viewer`.
"""

from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, IsAuthenticated

VIEWERS_GROUP = "viewers"


def is_viewer(user) -> bool:
    """In the `viewers` group (and not a superuser, who is never restricted by a group)."""
    if not getattr(user, "is_authenticated", False) or user.is_superuser:
        return False
    # Cached on the user object: a request asks more than once (permission, then the dashboard's template).
    cached = getattr(user, "_cb_is_viewer", None)
    if cached is None:
        cached = user.groups.filter(name=VIEWERS_GROUP).exists()
        user._cb_is_viewer = cached
    return cached


class IsAuthenticatedViewerReadOnly(IsAuthenticated):
    """Authenticated (as before), and a viewer may only use safe methods: every write answers 403."""

    message = "Read-only access: users in the viewers group cannot change anything."

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        return request.method in SAFE_METHODS or not is_viewer(request.user)
