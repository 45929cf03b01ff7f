"""`manage.py create_api_token USER [--staff] [--viewer] [--rotate]`: print a DRF token for USER, creating the
user if needed; `--viewer` puts the user in the read-only `viewers` group."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = (
        "Print an API token for USER (creating the user, with no password, if needed). "
        "Use it as: curl -H 'Authorization: Token <token>' ..."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--staff",
            action="store_true",
            help="Mark the user as staff (for the admin, also set a password: changepassword USER).",
        )
        parser.add_argument(
            "--viewer",
            action="store_true",
            help="Put the user in the `viewers` group: read the API, dashboard and /metrics; write nothing.",
        )
        parser.add_argument(
            "--rotate",
            action="store_true",
            help="Replace the user's existing token (the old one stops working).",
        )

    @transaction.atomic
    def handle(
        self, *args, username: str, staff: bool, rotate: bool, viewer: bool = False, **options
    ) -> None:
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(**{user_model.USERNAME_FIELD: username})
        if created:
            # A token-only account: no password, so no admin or session login until one is set.
            user.set_unusable_password()
        if staff and not user.is_staff:
            user.is_staff = True
        user.save()
        if viewer:
            from django.contrib.auth.models import Group

            from monitoring.permissions import VIEWERS_GROUP

            user.groups.add(Group.objects.get_or_create(name=VIEWERS_GROUP)[0])
        if rotate:
            Token.objects.filter(user=user).delete()
        token, _ = Token.objects.get_or_create(user=user)
        if created:
            self.stderr.write(f"created user {username!r}")
        # The token alone on stdout, so scripts can do TOKEN=$(manage.py create_api_token alice).
        self.stdout.write(token.key)
