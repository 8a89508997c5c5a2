"""What runs are runs of: projects, environments, suites, test cases and dependencies.

Each comes from RunStarted (its project, environment, suite and plan). Ids are uuid5 of the
natural keys, so the same log always yields the same ids and a rebuild compares equal
row by row; a test case is (suite, test, definition hash): an edited test is a new case.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import NamedTuple

import asyncpg
import msgspec

from events.projections._sql import Column, earliest, latest, upsert
from events.types import RunStarted

NAMESPACE = uuid.UUID("cf1a8a39-85ad-508b-b782-28c39f0bbb4e")
DEFAULT_ORGANIZATION_ID = uuid.UUID("433e9607-96fe-50a2-bd23-f3af13ad64a0")
"""The organization of runs started from the command line (schema.sql step 3 creates it)."""
DEFAULT_ENVIRONMENT = "default"
"""The environment of a run started without ``--env``."""


def derive(kind: str, *parts: object) -> uuid.UUID:
    """The id of a ``kind`` of row from its natural key."""
    return uuid.uuid5(NAMESPACE, "\x00".join([kind, *(str(part) for part in parts)]))


def as_uuid(kind: str, text: str) -> uuid.UUID:
    """The id of a run or batch: the id in its events when that is a uuid (Baton's are),
    else derived from it."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return derive(kind, text)


class Identity(msgspec.Struct, frozen=True):
    """Where a run belongs, and its planned tests' case ids by name."""

    organization_id: uuid.UUID
    project_id: uuid.UUID
    suite_id: uuid.UUID
    environment_id: uuid.UUID
    cases: dict[str, uuid.UUID]


class ProjectRow(NamedTuple):
    id: uuid.UUID
    organization_id: uuid.UUID
    name: str
    created_at: datetime
    last_run_at: datetime


class EnvironmentRow(NamedTuple):
    id: uuid.UUID
    organization_id: uuid.UUID
    project_id: uuid.UUID
    name: str
    created_at: datetime


class SuiteRow(NamedTuple):
    id: uuid.UUID
    organization_id: uuid.UUID
    project_id: uuid.UUID
    name: str
    digest: str
    source: str
    created_at: datetime
    last_run_at: datetime


class CaseRow(NamedTuple):
    id: uuid.UUID
    organization_id: uuid.UUID
    suite_id: uuid.UUID
    name: str
    definition_hash: str
    created_at: datetime
    last_run_at: datetime


class DependencyRow(NamedTuple):
    organization_id: uuid.UUID
    dependent_test_id: uuid.UUID
    required_test_id: uuid.UUID
    dependency_type: str


def _columns(row: type[tuple[object, ...]], types: dict[str, str]) -> list[Column]:
    fields: tuple[str, ...] = row._fields  # type: ignore[attr-defined]
    return [
        (name, types.get(name, "uuid" if name == "id" or name.endswith("_id") else "text"))
        for name in fields
    ]


_TIMES = {"created_at": "timestamptz", "last_run_at": "timestamptz"}
_PROJECTS = _columns(ProjectRow, _TIMES)
_ENVIRONMENTS = _columns(EnvironmentRow, _TIMES)
_SUITES = _columns(SuiteRow, _TIMES)
_CASES = _columns(CaseRow, _TIMES)
_DEPENDENCIES = _columns(DependencyRow, {})


class Catalog:
    """The catalog rows that one page of events mentions, each once, ready to upsert.

    Within a page, as the upserts do across pages, ``created_at`` is the earliest time seen,
    ``last_run_at`` the latest, and the latest run (by time; a tie: the later position) sets
    a suite's digest and source. recorded_at is when an event happened, stamped by the
    process that wrote it, so it need not grow with positions: by times, the result depends
    neither on where pages begin nor on the order runs were recorded in, and retention,
    which removes a suite's oldest runs, can say from the remaining runs alone what a
    rebuild would (events.retention_sql).
    """

    def __init__(self) -> None:
        self._projects: dict[uuid.UUID, ProjectRow] = {}
        self._environments: dict[uuid.UUID, EnvironmentRow] = {}
        self._suites: dict[uuid.UUID, SuiteRow] = {}
        self._cases: dict[uuid.UUID, CaseRow] = {}
        self._dependencies: dict[tuple[uuid.UUID, uuid.UUID], DependencyRow] = {}

    def add(self, started: RunStarted, at: datetime, organization_id: uuid.UUID) -> Identity:
        org = organization_id
        project = derive("project", org, started.project)
        environment_name = started.environment or DEFAULT_ENVIRONMENT
        environment = derive("environment", project, environment_name)
        suite = derive("suite", project, started.suite)
        known = self._projects.get(project)
        self._projects[project] = (
            known._replace(
                created_at=min(known.created_at, at), last_run_at=max(known.last_run_at, at)
            )
            if known
            else ProjectRow(project, org, started.project, at, at)
        )
        known_environment = self._environments.get(environment)
        self._environments[environment] = (
            known_environment._replace(created_at=min(known_environment.created_at, at))
            if known_environment
            else EnvironmentRow(environment, org, project, environment_name, at)
        )
        known_suite = self._suites.get(suite)
        latest_suite = known_suite is None or at >= known_suite.last_run_at
        self._suites[suite] = SuiteRow(
            suite,
            org,
            project,
            started.suite,
            started.suite_digest if latest_suite or not known_suite else known_suite.digest,
            started.source if latest_suite or not known_suite else known_suite.source,
            min(known_suite.created_at, at) if known_suite else at,
            max(known_suite.last_run_at, at) if known_suite else at,
        )
        cases: dict[str, uuid.UUID] = {}
        for planned in started.plan:
            case = derive("test", suite, planned.name, planned.definition_hash)
            cases[planned.name] = case
            known_case = self._cases.get(case)
            self._cases[case] = (
                known_case._replace(
                    created_at=min(known_case.created_at, at),
                    last_run_at=max(known_case.last_run_at, at),
                )
                if known_case
                else CaseRow(case, org, suite, planned.name, planned.definition_hash, at, at)
            )
        for planned in started.plan:
            for required, kind in planned.depends_on.items():
                if required in cases and required != planned.name:
                    edge = (cases[planned.name], cases[required])
                    self._dependencies.setdefault(edge, DependencyRow(org, *edge, kind))
        return Identity(org, project, suite, environment, cases)

    async def write(self, conn: asyncpg.Connection) -> None:
        await upsert(
            conn,
            "projects",
            _PROJECTS,
            list(self._projects.values()),
            key=["id"],
            update=[earliest("projects", "created_at"), latest("projects", "last_run_at")],
        )
        await upsert(
            conn,
            "environments",
            _ENVIRONMENTS,
            list(self._environments.values()),
            key=["id"],
            update=[earliest("environments", "created_at")],
        )
        # SET reads the stored row as it was: the digest goes with the later last_run_at
        newer = "excluded.last_run_at >= test_suites.last_run_at"
        await upsert(
            conn,
            "test_suites",
            _SUITES,
            list(self._suites.values()),
            key=["id"],
            update=[
                f"digest = CASE WHEN {newer} THEN excluded.digest ELSE test_suites.digest END",
                f"source = CASE WHEN {newer} THEN excluded.source ELSE test_suites.source END",
                earliest("test_suites", "created_at"),
                latest("test_suites", "last_run_at"),
            ],
        )
        await upsert(
            conn,
            "test_cases",
            _CASES,
            list(self._cases.values()),
            key=["id"],
            update=[earliest("test_cases", "created_at"), latest("test_cases", "last_run_at")],
        )
        await upsert(
            conn,
            "test_dependencies",
            _DEPENDENCIES,
            list(self._dependencies.values()),
            key=["dependent_test_id", "required_test_id"],
        )
