"""The dashboard's comparison of two runs, ``/runs/{a}/diff/{b}``: what
``GET /api/v1/runs/{a}/diff/{b}`` answers (orchestrator.run_diff), as a table. Another
organization's run is absent (404), as on every page."""

from __future__ import annotations

import uuid

from litestar import Response, Router, get
from litestar.params import FromPath

from context_service.api.common import PrincipalDep, ServicesDep
from context_service.api.runs import run_diff
from context_service.dashboard import error_page, page, to_login
from context_service.errors import ServiceError, Unauthorized


@get("/runs/{run_id:uuid}/diff/{other:uuid}", name="dashboard:diff")
async def diff_page(
    services: ServicesDep,
    principal: PrincipalDep,
    run_id: FromPath[uuid.UUID],
    other: FromPath[uuid.UUID],
) -> Response[str]:
    """Run A (``run_id``) against run B (``other``), test by test."""
    found = await run_diff(services, principal, run_id, other)
    return page("diff.html", diff=found)


router = Router(
    "/",
    route_handlers=[diff_page],
    exception_handlers={Unauthorized: to_login, ServiceError: error_page},
    include_in_schema=False,
)
"""The comparison page, for ``create_app``."""
