"""The `viewers` group: read-only access to the API, the dashboard and /metrics (monitoring.permissions)."""

from django.db import migrations

VIEWERS = "viewers"


def create_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.get_or_create(name=VIEWERS)


def delete_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name=VIEWERS).delete()


class Migration(migrations.Migration):
    dependencies = [("auth", "0012_alter_user_first_name_max_length")]

    operations = [migrations.RunPython(create_group, delete_group)]
