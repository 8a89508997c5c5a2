"""A run the service started, as a job for ``baton worker`` (the service's BATON_QUEUE_URL).

A batch's job names flow paths that the worker's checkout holds; a service run's flow is
an upload, its environment's secrets are in the service's database. So the job carries
all of it, resolved and checked by the service: the flow's text, the tests to run (a
rerun's subset), the variables, env and secrets, the values to mask, what RunStarted says
of the run (organization, project, session), a rerun's reused captures, and the service's
restrictions (its BATON_ALLOWED_TARGETS, the bounded template limits). It travels sealed
with the shared Cipher: nothing of it is in clear on the queue (only the RunStarted beside
it, QueuedJob.started, as the log keeps it), so the workers need the service's secret key
(the same BATON_SECRET_KEY, or BATON_HOME).
"""

from __future__ import annotations

from typing import Any

import msgspec

from events import types as ev
from events.secrets import Cipher
from orchestrator.loader import load_text
from orchestrator.planner import Plan, Scope, plan
from orchestrator.runner import RunInputs

API_CANCELLED = "cancelled through the API"
"""The reason of the RunCancelled of a run cancelled with POST /api/v1/runs/{id}/cancel."""


class ServiceRun(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker needs to run one of the service's runs as the service would."""

    run_id: str
    content: str
    """The uploaded flow file's text."""
    filename: str
    """Its (safe) file name: the run's source."""
    tests: list[str]
    """The plan's order: every test the tags select, or a rerun's tests."""
    tags: list[str]
    variables: dict[str, Any]
    env: dict[str, str]
    secrets: dict[str, str]
    hidden: list[str]
    environment: str
    organization: str
    project: str | None
    reused: list[ev.VariableCaptured | ev.AuthTokenUpdated]
    session_id: str
    allowed_targets: str | None
    """The service's BATON_ALLOWED_TARGETS (None: public addresses only)."""
    reused_at: list[tuple[str, str, int]] = []
    """(test, capture, microseconds since the epoch): when each reused capture was first
    made (RunInputs.reused_at), so that its ttl counts from then."""

    @classmethod
    def of(
        cls, content: str, planned: Plan, inputs: RunInputs, allowed_targets: str | None
    ) -> ServiceRun:
        return cls(
            run_id=inputs.run_id,
            content=content,
            filename=planned.loaded.label,
            tests=list(planned.order),
            tags=list(inputs.tags),
            variables=dict(inputs.variables),
            env=dict(inputs.env),
            secrets=dict(inputs.secrets),
            hidden=list(inputs.hidden),
            environment=inputs.environment,
            organization=inputs.organization,
            project=inputs.project,
            reused=list(inputs.reused),
            session_id=inputs.session_id,
            allowed_targets=allowed_targets,
            reused_at=[(test, name, at) for (test, name), at in inputs.reused_at.items()],
        )

    def sealed(self, cipher: Cipher) -> str:
        return cipher.encrypt(msgspec.json.encode(self).decode())

    @classmethod
    def unsealed(cls, token: str, cipher: Cipher) -> ServiceRun:
        """Raises SecretError (another key) or msgspec.DecodeError."""
        return msgspec.json.decode(cipher.decrypt(token), type=cls)

    def rebuilt(self) -> tuple[Plan, RunInputs]:
        """The run's plan and inputs, as the service made them; raises UsageError if this
        version of Baton reads the flow otherwise than the service's did."""
        loaded = load_text(self.content, self.filename)
        scope = Scope({*loaded.flow.variables, *self.variables}, self.env, self.secrets)
        full = plan(loaded, scope, self.tags)
        inputs = RunInputs(
            variables=self.variables,
            env=self.env,
            secrets=self.secrets,
            environment=self.environment,
            tags=tuple(self.tags),
            hidden=tuple(self.hidden),
            organization=self.organization,
            project=self.project,
            reused=tuple(self.reused),
            reused_at={(test, name): at for test, name, at in self.reused_at},
            run_id=self.run_id,
            session_id=self.session_id,
            cancel_reason=API_CANCELLED,
        )
        return full.only(self.tests), inputs
