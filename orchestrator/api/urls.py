"""Routes for jobs and directives. Every path works with and without the trailing slash."""

from orchestrator.api.views import DirectiveViewSet, JobViewSet
from project.api import OptionalSlashRouter

router = OptionalSlashRouter()
router.register("jobs", JobViewSet, basename="job")
router.register("directives", DirectiveViewSet, basename="directive")

urlpatterns = router.urls
