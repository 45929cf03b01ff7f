"""Routes for schedules and runs. Every path works with and without the trailing slash."""

from project.api import OptionalSlashRouter
from schedules.api.views import CalendarViewSet, RunLaunchViewSet, ScheduleViewSet

router = OptionalSlashRouter()
router.register("schedules", ScheduleViewSet, basename="schedule")
router.register("calendars", CalendarViewSet, basename="calendar")
# Runs are orchestrator rows; the launching viewset lives in schedules (see RunLaunchViewSet).
router.register("runs", RunLaunchViewSet, basename="run")

urlpatterns = router.urls
