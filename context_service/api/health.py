"""/api/v1/projects/{id}/services/health: each service's latest health check and its
recent history, from service_health_checks (the projector keeps it from the
ServiceHealthChecked events of ``baton run``), read under row-level security."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import FromPath, QueryParameter

from context_service.api.common import PrincipalDep, ServicesDep


class HealthCheck(msgspec.Struct, frozen=True):
    status: str
    """healthy, degraded (slower than its degraded_after, or only after a retry),
    unhealthy or timeout."""
    checked_at: datetime
    url: str
    attempts: int
    response_time_ms: float | None
    status_code: int | None
    error: str
    suite: str


class ServiceHealth(msgspec.Struct, frozen=True):
    service: str
    status: str
    """The latest check's."""
    checked_at: datetime
    history: list[HealthCheck]
    """Newest first, the latest included."""


class ProjectServicesHealth(msgspec.Struct, frozen=True):
    project_id: uuid.UUID
    services: list[ServiceHealth]


_HISTORY = """
SELECT service, status, checked_at, url, attempts, response_time_ms, status_code, error, suite
FROM (
    SELECT h.*, row_number() OVER (
        PARTITION BY h.service ORDER BY h.checked_at DESC, h.id DESC) AS n
    FROM service_health_checks h WHERE h.project_id = $1
) AS ranked
WHERE n <= $2
ORDER BY service, n
"""


class ServiceHealthController(Controller):
    path = "/api/v1/projects/{project_id:uuid}/services"
    tags = ("services",)

    @get("/health")
    async def services_health(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        project_id: FromPath[uuid.UUID],
        history: Annotated[
            int, QueryParameter(ge=1, le=100, description="checks kept per service, newest first")
        ] = 10,
    ) -> ProjectServicesHealth:
        async with services.db.tenant(principal.organization_id) as conn:
            rows = await conn.fetch(_HISTORY, project_id, history)
        found: dict[str, list[HealthCheck]] = {}
        for row in rows:
            found.setdefault(row["service"], []).append(HealthCheck(*list(row.values())[1:]))
        return ProjectServicesHealth(
            project_id,
            [
                ServiceHealth(name, checks[0].status, checks[0].checked_at, checks)
                for name, checks in found.items()
            ],
        )
