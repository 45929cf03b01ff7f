"""/dashboard/: server-rendered pages, their JSON for polling, and the buttons (POST, CSRF-protected)."""

from django.urls import path

from monitoring import dashboard

app_name = "dashboard"

urlpatterns = [
    path("", dashboard.index, name="index"),
    path("calendar", dashboard.calendar_page, name="calendar"),
    path("state.json", dashboard.state, name="state"),
    path("schedules/bulk", dashboard.bulk_action, name="bulk"),
    path("schedules/<int:pk>/", dashboard.schedule_page, name="schedule"),
    path("schedules/<int:pk>/run-now", dashboard.run_now, name="run-now"),
    path("schedules/<int:pk>/enable", dashboard.enable, name="enable"),
    path("schedules/<int:pk>/disable", dashboard.disable, name="disable"),
    path("runs/<int:pk>/", dashboard.run_page, name="run"),
    path("runs/<int:pk>/cancel", dashboard.cancel_run, name="cancel-run"),
]
