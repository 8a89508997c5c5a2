"""The SQL of ``events.retention_apply``: facts read, rows archived, rows removed.

Removing a run leaves the read tables as a rebuild from the remaining log would make them:
its rows go, the daily rollups of its days are recomputed from what remains, and the
catalog (projects, environments, suites, test cases) loses what no remaining run names and
takes its first and last sightings from the remaining runs.
"""

from __future__ import annotations

from events.projections.metrics import RESULT_AGGREGATES

POLICIES = (
    "SELECT project, passed_days, failed_days, metrics_days, context_hours FROM retention_policies"
)
SET_POLICY = """
INSERT INTO retention_policies (project, passed_days, failed_days, metrics_days, context_hours)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (project) DO UPDATE SET
    passed_days = coalesce(excluded.passed_days, retention_policies.passed_days),
    failed_days = coalesce(excluded.failed_days, retention_policies.failed_days),
    metrics_days = coalesce(excluded.metrics_days, retention_policies.metrics_days),
    context_hours = coalesce(excluded.context_hours, retention_policies.context_hours),
    updated_at = now()
"""
RESET_POLICY = "DELETE FROM retention_policies WHERE project = $1"

ENDED_RUNS = """
SELECT r.id, r.stream, r.organization_id, p.name AS project, r.status, r.started_at,
    r.ended_at, EXISTS (SELECT FROM test_execution_context c WHERE c.run_id = r.id) AS has_context
FROM test_runs r JOIN projects p ON p.id = r.project_id
WHERE r.ended_at IS NOT NULL AND r.ended_at <= $1
  -- past the context window only, a run matters only while it has a context
  AND (r.ended_at <= $2 OR EXISTS (SELECT FROM test_execution_context c WHERE c.run_id = r.id))
ORDER BY r.ended_at, r.id
"""
MONTHS = """
SELECT organization_id, project, month, count(*) AS rows
FROM performance_metrics_monthly GROUP BY organization_id, project, month
ORDER BY month, project, organization_id
"""

# what a run's archive holds: every read row that derives from it, a table at a time, for
# the runs of a chunk ($1) at once: (run id, the row as JSON)
RUN_ROWS = {
    "test_runs": "SELECT id, to_jsonb(t)::text FROM test_runs t WHERE id = ANY($1)",
    "test_execution_context": (
        "SELECT run_id, to_jsonb(t)::text FROM test_execution_context t WHERE run_id = ANY($1)"
    ),
    "test_results": (
        "SELECT run_id, to_jsonb(t)::text FROM test_results t WHERE run_id = ANY($1)"
        " ORDER BY test_name"
    ),
    "test_result_details": (
        "SELECT r.run_id, to_jsonb(d)::text FROM test_result_details d JOIN test_results r"
        " ON r.id = d.result_id WHERE r.run_id = ANY($1) ORDER BY d.position"
    ),
    "failure_analysis": (
        "SELECT run_id, to_jsonb(t)::text FROM failure_analysis t WHERE run_id = ANY($1)"
        " ORDER BY result_id"
    ),
    "test_run_history": (
        "SELECT run_id, to_jsonb(t)::text FROM test_run_history t WHERE run_id = ANY($1)"
        " ORDER BY test_case_id"
    ),
    # the service's record of a run it started: left behind, the service would take the
    # run for one started a moment ago and not projected yet
    "service_runs": "SELECT id, to_jsonb(t)::text FROM service_runs t WHERE id = ANY($1)",
}
CONTEXT_ROW = "SELECT to_jsonb(t)::text FROM test_execution_context t WHERE run_id = $1"
MONTH_ROWS = """
SELECT to_jsonb(t)::text FROM performance_metrics_monthly t
WHERE organization_id = $1 AND project = $2 AND month = $3 ORDER BY suite, test_name, environment
"""

# ---- removing runs ---------------------------------------------------------------------------

RESULT_DAYS = """
SELECT DISTINCT test_case_id, environment_id, (ended_at AT TIME ZONE 'UTC')::date
FROM test_results WHERE run_id = ANY($1) AND ended_at IS NOT NULL
"""
RUN_DAYS = """
SELECT DISTINCT suite_id, environment_id, (ended_at AT TIME ZONE 'UTC')::date
FROM test_runs WHERE id = ANY($1) AND ended_at IS NOT NULL
"""
RUN_PROJECTS = "SELECT DISTINCT project_id FROM test_runs WHERE id = ANY($1)"

# Each month a leaving run's executions fall in, taken whole from test_results while every
# result of the month is still there (with the default windows a month has ended 90 days
# before its first run leaves); a month taken once is never taken again.
TAKE_MONTHS = f"""
WITH keys AS (
    SELECT DISTINCT test_case_id, environment_id,
        date_trunc('month', ended_at AT TIME ZONE 'UTC')::date AS month
    FROM test_results
    WHERE run_id = ANY($1) AND status IN ('passed', 'failed') AND ended_at IS NOT NULL
)
INSERT INTO performance_metrics_monthly (organization_id, project_id, project, suite,
    test_name, test_case_id, environment_id, environment, month, total_runs, successful_runs,
    avg_response_time_ms, p50_response_time_ms, p95_response_time_ms, p99_response_time_ms,
    success_rate)
SELECT r.organization_id, s.project_id, p.name, s.name, c.name, k.test_case_id,
    k.environment_id, e.name, k.month,{RESULT_AGGREGATES}
FROM keys k
JOIN test_results r
  ON r.test_case_id = k.test_case_id
 AND r.environment_id = k.environment_id
 AND r.ended_at >= k.month::timestamp AT TIME ZONE 'UTC'
 AND r.ended_at < (k.month + interval '1 month')::timestamp AT TIME ZONE 'UTC'
JOIN test_cases c ON c.id = k.test_case_id
JOIN test_suites s ON s.id = c.suite_id
JOIN projects p ON p.id = s.project_id
JOIN environments e ON e.id = k.environment_id
WHERE r.status IN ('passed', 'failed')
GROUP BY r.organization_id, s.project_id, p.name, s.name, c.name, k.test_case_id,
    k.environment_id, e.name, k.month
ON CONFLICT (test_case_id, environment_id, month) DO NOTHING
"""

REMOVE_RUNS = [
    "DELETE FROM test_run_history WHERE run_id = ANY($1)",
    "DELETE FROM service_runs WHERE id = ANY($1)",
    # test_execution_context, test_results, their details and failure analysis cascade
    "DELETE FROM test_runs WHERE id = ANY($1)",
]

# The catalog of the touched projects ($1) as the remaining runs make it, by the rules the
# projector keeps (events.projections.catalog): the earliest start, the latest, and the
# latest run's digest and source.
TIDY_CATALOG = [
    """DELETE FROM test_cases c USING test_suites s
       WHERE c.suite_id = s.id AND s.project_id = ANY($1)
         AND NOT EXISTS (SELECT FROM test_results r WHERE r.test_case_id = c.id)""",
    """DELETE FROM test_suites s WHERE s.project_id = ANY($1)
         AND NOT EXISTS (SELECT FROM test_runs r WHERE r.suite_id = s.id)""",
    """DELETE FROM environments e WHERE e.project_id = ANY($1)
         AND NOT EXISTS (SELECT FROM test_runs r WHERE r.environment_id = e.id)""",
    """DELETE FROM projects p WHERE p.id = ANY($1)
         AND NOT EXISTS (SELECT FROM test_runs r WHERE r.project_id = p.id)""",
    """UPDATE projects p SET created_at = f.first_at, last_run_at = f.last_at
       FROM (SELECT project_id, min(started_at) AS first_at, max(started_at) AS last_at
             FROM test_runs WHERE project_id = ANY($1) GROUP BY project_id) f
       WHERE p.id = f.project_id""",
    """UPDATE environments e SET created_at = f.first_at
       FROM (SELECT environment_id, min(started_at) AS first_at
             FROM test_runs WHERE project_id = ANY($1) GROUP BY environment_id) f
       WHERE e.id = f.environment_id""",
    """UPDATE test_suites s SET created_at = f.first_at, last_run_at = f.last_at,
           digest = l.suite_digest, source = l.source
       FROM (SELECT suite_id, min(started_at) AS first_at, max(started_at) AS last_at
             FROM test_runs WHERE project_id = ANY($1) GROUP BY suite_id) f,
            (SELECT DISTINCT ON (suite_id) suite_id, suite_digest, source
             FROM test_runs WHERE project_id = ANY($1)
             ORDER BY suite_id, started_at DESC, id DESC) l
       WHERE s.id = f.suite_id AND s.id = l.suite_id""",
    """UPDATE test_cases c SET created_at = f.first_at, last_run_at = f.last_at
       FROM (SELECT t.test_case_id, min(r.started_at) AS first_at, max(r.started_at) AS last_at
             FROM test_results t JOIN test_runs r ON r.id = t.run_id
             WHERE r.project_id = ANY($1) GROUP BY t.test_case_id) f
       WHERE c.id = f.test_case_id""",
]

# ---- contexts and months ---------------------------------------------------------------------

MARK_CONTEXTS_EXPIRED = """
INSERT INTO baton_expired_contexts (run_id, expired_at)
SELECT unnest($1::uuid[]), $2 ON CONFLICT (run_id) DO NOTHING
"""
REMOVE_CONTEXTS = "DELETE FROM test_execution_context WHERE run_id = ANY($1::uuid[])"
REMOVE_MONTH = """
DELETE FROM performance_metrics_monthly WHERE organization_id = $1 AND project = $2 AND month = $3
"""
LOCK = "SELECT pg_advisory_lock(hashtext('baton-retention'))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext('baton-retention'))"
