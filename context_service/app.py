"""The Litestar application: ``create_app(settings)`` builds it; nothing connects until the
app starts (its lifespan opens the services and closes them at shut-down).

Routers of other modules (realtime streams, dashboard pages, the Supabase adapter) join
through ``extra_routers``; they get the same dependencies (``services``, ``principal``,
``page``), the same API-key middleware (a key with the scope the route needs), and the
same problem details.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ControllerRouterHandler

from context_service import auth
from context_service.api.common import DEPENDENCIES
from context_service.errors import EXCEPTION_HANDLERS
from context_service.services import Health, Services
from events.settings import Settings
from orchestrator.errors import UsageError
from orchestrator.targets import TargetPolicy

MAX_BODY_BYTES = 1024 * 1024
"""The largest request body accepted (413 beyond): a bulk request of flow files fits."""


@get("/health", opt={auth.EXCLUDE_OPT: True}, tags=["health"])
async def health(request: Request[Any, Any, Any]) -> Response[Health]:
    """Up, degraded or down (503) to anyone; with a valid key, also PostgreSQL, Redis and
    the projector, each with its state and where it is."""
    services: Services = request.app.state.services
    report = await services.health()
    if not await _has_valid_key(services, request):
        report = Health(report.status)  # where the database is and how far: not public
    return Response(report, status_code=503 if report.status == "down" else 200)


async def _has_valid_key(services: Services, request: Request[Any, Any, Any]) -> bool:
    key = auth.key_of(request)
    if key is None:
        return False
    try:
        return await services.db.principal(key) is not None
    except Exception:  # the database is down: /health says so, without the details
        return False


def _routers() -> list[ControllerRouterHandler]:
    from context_service.analytics_page import router as analytics_page
    from context_service.api.environments import EnvironmentController
    from context_service.api.health import ServiceHealthController
    from context_service.api.keys import KeyController
    from context_service.api.projects import ProjectController
    from context_service.api.runs import RunController
    from context_service.api.sessions import SessionController
    from context_service.api.suites import SuiteController
    from context_service.api.tests import TestCaseController
    from context_service.dashboard import router as dashboard
    from context_service.diff_page import router as diff_page
    from context_service.realtime import RealtimeController

    return [
        health,
        ProjectController,
        SuiteController,
        TestCaseController,
        EnvironmentController,
        RunController,
        ServiceHealthController,
        SessionController,
        KeyController,
        dashboard,
        analytics_page,
        diff_page,
        RealtimeController,
    ]


def _freeze_startup_objects() -> None:
    # What start-up made (modules, the app, its routes: ~100,000 objects) lives as long as
    # the process. Left to the cyclic collector, every full collection walks them all, a
    # ~65 ms stall of every request in flight, every few seconds under load: the p99 of a
    # context read (bench/API.md). Frozen, a full collection walks only what came since.
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings,
    *,
    extra_routers: Sequence[ControllerRouterHandler] = (),
    services: Services | None = None,
) -> Litestar:
    """The service for ``settings``. ``services``: already open ones (the app then leaves
    them open at shut-down), else the app opens its own at start-up."""
    try:
        TargetPolicy.parse(settings.allowed_targets)  # a wrong value: a usage error, at once
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if services is not None:
            app.state.services = services
            _freeze_startup_objects()
            yield
            return
        opened = await Services.open(settings)
        app.state.services = opened
        _freeze_startup_objects()
        try:
            yield
        finally:
            await opened.aclose()

    openapi = OpenAPIConfig(
        title="Baton",
        version="1",
        description="Runs of chains of dependent HTTP API tests, their contexts and events.",
        path="/schema",
        components=Components(
            security_schemes={
                "apiKey": SecurityScheme(
                    type="http", scheme="bearer", description="an API key (bk_...)"
                )
            }
        ),
        security=[{"apiKey": []}],
    )
    return Litestar(
        route_handlers=[*_routers(), *extra_routers],
        lifespan=[lifespan],
        middleware=[auth.middleware()],
        dependencies=DEPENDENCIES,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        openapi_config=openapi,
        request_max_body_size=MAX_BODY_BYTES,
        # the process's logging is the server's (uvicorn's) or the embedding program's
        logging_config=None,
        debug=False,
    )
