"""A Django paginator that never counts a big table: the API's lists and the admin's changelists use it.

`count(*)` over millions of runs reads every row (PostgreSQL keeps no row count), so a list page that
shows "10,000,000 runs" would spend most of its time counting. PostgreSQL's planner already estimates how
many rows a query returns (from ANALYZE's statistics): when that estimate is above EXACT_COUNT_LIMIT the
paginator uses it, and otherwise it counts exactly, bounded (`SELECT count(*) FROM (... LIMIT 10001)`), so
a wrong estimate still costs at most 10,001 rows. Below 10,000 results every count is exact; above, it
is PostgreSQL's estimate (usually within a few percent), and the last pages are reached with filters
rather than by paging (docs/BENCHMARKS.md, "Pages at production size").
"""

from __future__ import annotations

import json

from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.utils.functional import cached_property

EXACT_COUNT_LIMIT = 10_000


def estimated_rows(queryset: QuerySet) -> int:
    """The planner's estimate of how many rows `queryset` returns (EXPLAIN, nothing executed)."""
    plan = json.loads(_rows_only(queryset).explain(format="json"))
    return int(plan[0]["Plan"]["Plan Rows"])


def bounded_count(queryset: QuerySet) -> int:
    """The exact number of rows when at most EXACT_COUNT_LIMIT, else the planner's estimate (at least
    EXACT_COUNT_LIMIT + 1)."""
    estimate = estimated_rows(queryset)
    if estimate > EXACT_COUNT_LIMIT:
        return estimate
    exact = _rows_only(queryset)[: EXACT_COUNT_LIMIT + 1].count()
    return exact if exact <= EXACT_COUNT_LIMIT else max(estimate, exact)


def _rows_only(queryset: QuerySet) -> QuerySet:
    """The same rows, unordered, selecting only the key: a list's annotations (a subquery per row, such as
    the run list's schedule) are not computed for counting."""
    return queryset.order_by().values("pk")


class EstimatedCountPaginator(Paginator):
    """Paginator whose `count` is exact up to EXACT_COUNT_LIMIT results and estimated above."""

    @cached_property
    def count(self) -> int:
        if isinstance(self.object_list, QuerySet):
            return bounded_count(self.object_list)
        return super().count
