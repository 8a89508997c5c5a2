-- Baton's PostgreSQL schema: the one definition, versioned in numbered steps.
--
-- Each step begins with a line "-- step N: name". Baton (events.migrations, `baton db
-- migrate`, and every connect) applies the steps that baton_schema_version does not list
-- yet, in one transaction under an advisory lock, so processes starting together do not
-- race, and records each one. Every statement is idempotent as well (IF NOT EXISTS, CREATE
-- OR REPLACE, guarded DO blocks), so `psql -f schema.sql` applied twice changes nothing.
-- A change is a new step appended at the end, never an edit of an applied step: the
-- digest of every step is pinned in tests/test_schema.py.

CREATE TABLE IF NOT EXISTS baton_schema_version (
    step        int PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- step 1: event store
--
-- stream names use the C collation: byte order is cheaper to compare than a locale's, and
-- it lets the primary key of baton_streams answer prefix ranges (list_streams).

CREATE TABLE IF NOT EXISTS events (
    position     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream       text COLLATE "C" NOT NULL,
    version      int NOT NULL CHECK (version > 0),
    event_id     uuid NOT NULL UNIQUE,
    type         text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    data         jsonb NOT NULL,
    -- also the index on stream: its leading column serves every by-stream read, so a
    -- separate index on stream alone would only slow down appends
    UNIQUE (stream, version)
);

-- One row per stream: its current version (read under the append lock instead of
-- max(version)) and when it began, for list_streams, newest first.
CREATE TABLE IF NOT EXISTS baton_streams (
    stream          text COLLATE "C" PRIMARY KEY,
    version         int NOT NULL,
    first_position  bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS baton_streams_newest ON baton_streams (first_position DESC);

-- Append events to one or more streams in one call (one round trip, one transaction).
--
-- The arrays are flat: append i is stream p_streams[i] expecting p_expected[i] (-1: any
-- version, 0: the stream must not exist) with the next p_counts[i] entries of p_ids,
-- p_types and p_data. Returns the global position of every event, aligned with p_ids.
--
-- Readers by position must never pass over an event that commits later with a lower
-- position. Every append takes one transaction-scoped advisory lock before it draws a
-- position and keeps it until its commit is visible, so positions become visible in
-- increasing order: a reader that sees position p also sees every committed position below
-- p. The alternative (an xid8 column read below pg_snapshot_xmin) orders by transaction id,
-- not by position, so a reader's checkpoint would have to be a (xid, position) pair; the
-- EventStore contract reads after a single position. The lock serialises commits, which is
-- cheap here: the lock is held for one function call and one WAL flush (~0.1 ms).
--
-- Errors: SQLSTATE BT001 = wrong expected version (DETAIL is JSON: stream, expected,
-- actual); BT002 = some ids of an append are stored already or repeated, others are not.
-- An append whose ids are all stored already in that stream is a re-send: it returns the
-- original positions, writes nothing and skips the version check.
CREATE OR REPLACE FUNCTION baton_append(
    p_streams text[], p_expected int[], p_counts int[],
    p_ids uuid[], p_types text[], p_data jsonb[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    positions bigint[] := '{}';
    part bigint[];
    cur int;
    n int;
    found_n int;
    lo int := 1;
    hi int;
BEGIN
    PERFORM pg_advisory_xact_lock(7283540231093542001);
    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        n := p_counts[i];
        hi := lo + n - 1;
        SELECT s.version INTO cur FROM baton_streams s WHERE s.stream = p_streams[i];
        cur := coalesce(cur, 0);
        IF p_expected[i] <> -1 AND p_expected[i] <> cur THEN
            -- a conflict may be a re-send of an append that was written already
            SELECT array_agg(e.position ORDER BY t.ord), count(e.position)
              INTO part, found_n
              FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
              LEFT JOIN events e ON e.event_id = t.id AND e.stream = p_streams[i];
            IF found_n <> n THEN
                RAISE EXCEPTION 'stream % is at version %, the append expected %',
                        p_streams[i], cur, p_expected[i]
                    USING ERRCODE = 'BT001',
                          DETAIL = json_build_object('stream', p_streams[i],
                              'expected', p_expected[i], 'actual', cur)::text;
            END IF;
        ELSIF n = 0 THEN
            part := '{}';
        ELSE
            WITH ins AS (
                INSERT INTO events (stream, version, event_id, type, data)
                SELECT p_streams[i], cur + t.ord, t.id, t.ty, t.d
                  FROM unnest(p_ids[lo:hi], p_types[lo:hi], p_data[lo:hi])
                       WITH ORDINALITY AS t(id, ty, d, ord)
                 ORDER BY t.ord
                ON CONFLICT (event_id) DO NOTHING
                RETURNING event_id, position
            )
            -- counted from ins itself: an id repeated in the call joins its one row twice
            SELECT array_agg(ins.position ORDER BY t.ord), (SELECT count(*) FROM ins)
              INTO part, found_n
              FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
              LEFT JOIN ins ON ins.event_id = t.id;
            IF found_n = n THEN
                INSERT INTO baton_streams AS s (stream, version, first_position)
                VALUES (p_streams[i], cur + n, part[1])
                ON CONFLICT (stream) DO UPDATE SET version = excluded.version;
            ELSIF found_n = 0 THEN
                -- every id stored already: a re-send of an append with any version
                SELECT array_agg(e.position ORDER BY t.ord), count(e.position)
                  INTO part, found_n
                  FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
                  LEFT JOIN events e ON e.event_id = t.id AND e.stream = p_streams[i];
            END IF;
            IF found_n <> n THEN
                RAISE EXCEPTION 'an append to stream % repeats an event id, or mixes new ids '
                        'with ids that are stored already (here or in another stream)', p_streams[i]
                    USING ERRCODE = 'BT002';
            END IF;
        END IF;
        positions := positions || part;
        lo := hi + 1;
    END LOOP;
    RETURN positions;
END
$$;

INSERT INTO baton_schema_version (step, name) VALUES (1, 'event store')
ON CONFLICT (step) DO NOTHING;

-- step 2: projection checkpoints and change notification
--
-- A projection's checkpoint is the last log position it applied. It is updated in the
-- same transaction as the projection's tables, so a page of events is applied exactly
-- once: a crash rolls back both.
CREATE TABLE IF NOT EXISTS baton_projection_checkpoints (
    name        text PRIMARY KEY,
    position    bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- baton_append as in step 1, plus a notification on channel baton_events after commit,
-- with the highest position appended as its payload. It is a doorbell, not a feed:
-- listeners (the projector, realtime fan-out) read the log after their own position, so a
-- lost or merged notice costs latency, never an event.
CREATE OR REPLACE FUNCTION baton_append(
    p_streams text[], p_expected int[], p_counts int[],
    p_ids uuid[], p_types text[], p_data jsonb[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    positions bigint[] := '{}';
    part bigint[];
    cur int;
    n int;
    found_n int;
    lo int := 1;
    hi int;
BEGIN
    PERFORM pg_advisory_xact_lock(7283540231093542001);
    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        n := p_counts[i];
        hi := lo + n - 1;
        SELECT s.version INTO cur FROM baton_streams s WHERE s.stream = p_streams[i];
        cur := coalesce(cur, 0);
        IF p_expected[i] <> -1 AND p_expected[i] <> cur THEN
            -- a conflict may be a re-send of an append that was written already
            SELECT array_agg(e.position ORDER BY t.ord), count(e.position)
              INTO part, found_n
              FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
              LEFT JOIN events e ON e.event_id = t.id AND e.stream = p_streams[i];
            IF found_n <> n THEN
                RAISE EXCEPTION 'stream % is at version %, the append expected %',
                        p_streams[i], cur, p_expected[i]
                    USING ERRCODE = 'BT001',
                          DETAIL = json_build_object('stream', p_streams[i],
                              'expected', p_expected[i], 'actual', cur)::text;
            END IF;
        ELSIF n = 0 THEN
            part := '{}';
        ELSE
            WITH ins AS (
                INSERT INTO events (stream, version, event_id, type, data)
                SELECT p_streams[i], cur + t.ord, t.id, t.ty, t.d
                  FROM unnest(p_ids[lo:hi], p_types[lo:hi], p_data[lo:hi])
                       WITH ORDINALITY AS t(id, ty, d, ord)
                 ORDER BY t.ord
                ON CONFLICT (event_id) DO NOTHING
                RETURNING event_id, position
            )
            -- counted from ins itself: an id repeated in the call joins its one row twice
            SELECT array_agg(ins.position ORDER BY t.ord), (SELECT count(*) FROM ins)
              INTO part, found_n
              FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
              LEFT JOIN ins ON ins.event_id = t.id;
            IF found_n = n THEN
                INSERT INTO baton_streams AS s (stream, version, first_position)
                VALUES (p_streams[i], cur + n, part[1])
                ON CONFLICT (stream) DO UPDATE SET version = excluded.version;
            ELSIF found_n = 0 THEN
                -- every id stored already: a re-send of an append with any version
                SELECT array_agg(e.position ORDER BY t.ord), count(e.position)
                  INTO part, found_n
                  FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
                  LEFT JOIN events e ON e.event_id = t.id AND e.stream = p_streams[i];
            END IF;
            IF found_n <> n THEN
                RAISE EXCEPTION 'an append to stream % repeats an event id, or mixes new ids '
                        'with ids that are stored already (here or in another stream)', p_streams[i]
                    USING ERRCODE = 'BT002';
            END IF;
        END IF;
        positions := positions || part;
        lo := hi + 1;
    END LOOP;
    IF array_length(positions, 1) > 0 THEN
        -- delivered when (and only if) the transaction commits
        PERFORM pg_notify('baton_events', (SELECT max(p) FROM unnest(positions) AS p)::text);
    END IF;
    RETURN positions;
END
$$;
INSERT INTO baton_schema_version (step, name)
VALUES (2, 'projection checkpoints and change notification') ON CONFLICT (step) DO NOTHING;

-- step 3: read model
--
-- Tables that events.projections keeps from the log (seed 002's data model, as far as
-- Baton's features read and write it). Every row derives from events only: ids are uuid5
-- of natural keys and times are the events' recorded_at, so a rebuild from the log gives
-- back the same rows. Every table carries organization_id for row-level security (step 4).
-- Left out until a feature writes them: users, organization_members, api_credentials,
-- environment_variables (the service's), fixtures, endpoints and report tables.

CREATE TABLE IF NOT EXISTS organizations (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]*$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- the organization of every run started from the command line
INSERT INTO organizations (id, slug, name)
VALUES ('433e9607-96fe-50a2-bd23-f3af13ad64a0', 'default', 'Default organization')
ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS projects (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (name <> ''),
    created_at       timestamptz NOT NULL,
    last_run_at      timestamptz NOT NULL,
    UNIQUE (organization_id, name)
);

CREATE TABLE IF NOT EXISTS environments (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id       uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (name <> ''),
    created_at       timestamptz NOT NULL,
    UNIQUE (project_id, name)
);

-- a flow file; digest and source are those of its latest run
CREATE TABLE IF NOT EXISTS test_suites (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id       uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name             text NOT NULL,
    digest           text NOT NULL,
    source           text NOT NULL,
    created_at       timestamptz NOT NULL,
    last_run_at      timestamptz NOT NULL,
    UNIQUE (project_id, name)
);

-- A test's identity is (project, suite, test, definition hash): editing a test makes a
-- new test case, so its history and metrics do not mix with the old definition's.
CREATE TABLE IF NOT EXISTS test_cases (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    suite_id         uuid NOT NULL REFERENCES test_suites (id) ON DELETE CASCADE,
    name             text NOT NULL,
    definition_hash  text NOT NULL,
    created_at       timestamptz NOT NULL,
    last_run_at      timestamptz NOT NULL,
    UNIQUE (suite_id, name, definition_hash)
);

CREATE TABLE IF NOT EXISTS test_dependencies (
    organization_id    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    dependent_test_id  uuid NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    required_test_id   uuid NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    dependency_type    text NOT NULL CHECK (dependency_type IN ('order', 'data', 'token')),
    PRIMARY KEY (dependent_test_id, required_test_id),
    CHECK (dependent_test_id <> required_test_id)
);
CREATE INDEX IF NOT EXISTS test_dependencies_required
    ON test_dependencies (required_test_id);

-- one per run stream; counts are live (from the results) and final at ended_at
CREATE TABLE IF NOT EXISTS test_runs (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id       uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    suite_id         uuid NOT NULL REFERENCES test_suites (id) ON DELETE CASCADE,
    environment_id   uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    stream           text COLLATE "C" NOT NULL UNIQUE,
    suite_digest     text NOT NULL,
    source           text NOT NULL,
    batch_id         uuid,
    batch_row        int CHECK (batch_row > 0),
    tags             jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(tags) = 'array'),
    status           text NOT NULL
                     CHECK (status IN ('running', 'passed', 'failed', 'cancelled', 'error')),
    total_tests      int NOT NULL CHECK (total_tests >= 0),
    passed_tests     int NOT NULL DEFAULT 0 CHECK (passed_tests >= 0),
    failed_tests     int NOT NULL DEFAULT 0 CHECK (failed_tests >= 0),
    skipped_tests    int NOT NULL DEFAULT 0 CHECK (skipped_tests >= 0),
    duration_ms      double precision CHECK (duration_ms >= 0),
    cancel_reason    text,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    CHECK ((status = 'running') = (ended_at IS NULL)),
    CHECK (passed_tests + failed_tests + skipped_tests <= total_tests),
    CHECK ((batch_id IS NULL) = (batch_row IS NULL))
);
CREATE INDEX IF NOT EXISTS test_runs_lookup ON test_runs (project_id, status, started_at DESC);
CREATE INDEX IF NOT EXISTS test_runs_recent ON test_runs (organization_id, started_at DESC);
CREATE INDEX IF NOT EXISTS test_runs_batch ON test_runs (batch_id, batch_row)
    WHERE batch_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS test_runs_tags ON test_runs USING gin (tags);

-- events.context.fold of the run's stream, as seed 002's columns. Secret values
-- (shared_auth_tokens, the shared_variables named in secret_names) are ciphertext.
CREATE TABLE IF NOT EXISTS test_execution_context (
    run_id              uuid PRIMARY KEY REFERENCES test_runs (id) ON DELETE CASCADE,
    organization_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    status              text NOT NULL
                        CHECK (status IN ('running', 'passed', 'failed', 'cancelled', 'error')),
    shared_auth_tokens  jsonb NOT NULL DEFAULT '{}'
                        CHECK (jsonb_typeof(shared_auth_tokens) = 'object'),
    shared_variables    jsonb NOT NULL DEFAULT '{}'
                        CHECK (jsonb_typeof(shared_variables) = 'object'),
    secret_names        jsonb NOT NULL DEFAULT '[]'
                        CHECK (jsonb_typeof(secret_names) = 'array'),
    captured_data       jsonb NOT NULL DEFAULT '{}'
                        CHECK (jsonb_typeof(captured_data) = 'object'),
    test_order          text[] NOT NULL DEFAULT '{}',
    statuses            jsonb NOT NULL DEFAULT '{}'
                        CHECK (jsonb_typeof(statuses) = 'object'),
    attempts            jsonb NOT NULL DEFAULT '{}'
                        CHECK (jsonb_typeof(attempts) = 'object'),
    version             int NOT NULL CHECK (version > 0),
    position            bigint NOT NULL CHECK (position > 0),
    updated_at          timestamptz NOT NULL
);

-- One per planned test per run, 'pending' from RunStarted until the test starts.
-- attempts counts retries (what flakiness reads), requests counts every request sent
-- (polls too); response_* describe the last response.
CREATE TABLE IF NOT EXISTS test_results (
    id                uuid PRIMARY KEY,
    organization_id   uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    run_id            uuid NOT NULL REFERENCES test_runs (id) ON DELETE CASCADE,
    test_case_id      uuid NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    environment_id    uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    test_name         text NOT NULL,
    status            text NOT NULL
                      CHECK (status IN ('pending', 'running', 'passed', 'failed', 'skipped')),
    attempts          int NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    requests          int NOT NULL DEFAULT 0 CHECK (requests >= 0),
    duration_ms       double precision CHECK (duration_ms >= 0),
    response_status   int,
    response_time_ms  double precision CHECK (response_time_ms >= 0),
    category          text CHECK (category IN ('assertion', 'timeout', 'connection',
                          'server_error', 'dependency_skipped', 'template', 'capture')),
    message           text NOT NULL DEFAULT '',
    started_at        timestamptz,
    ended_at          timestamptz,
    UNIQUE (run_id, test_name),
    CHECK ((status IN ('passed', 'failed', 'skipped')) = (ended_at IS NOT NULL)),
    CHECK (status <> 'failed' OR category IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS test_results_lookup
    ON test_results (test_case_id, environment_id, ended_at DESC);
CREATE INDEX IF NOT EXISTS test_results_recent ON test_results (organization_id, ended_at DESC);

-- What happened inside a result, one row per event: the request, the response excerpt,
-- each assertion, each capture (a secret capture's value is masked here). data holds
-- the event as the log has it; attempt is the request it belongs to.
CREATE TABLE IF NOT EXISTS test_result_details (
    event_id         uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    result_id        uuid NOT NULL REFERENCES test_results (id) ON DELETE CASCADE,
    position         bigint NOT NULL,
    attempt          int NOT NULL CHECK (attempt >= 0),
    kind             text NOT NULL CHECK (kind IN ('request', 'response', 'assertion', 'capture')),
    passed           boolean,
    data             jsonb NOT NULL,
    recorded_at      timestamptz NOT NULL,
    CHECK ((kind = 'assertion') = (passed IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS test_result_details_by_result
    ON test_result_details (result_id, position);

-- Per test case, environment and UTC day, over the day's passed and failed results
-- (skipped ones are not executions). Recomputed whenever a result of that day changes.
CREATE TABLE IF NOT EXISTS performance_metrics (
    organization_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    test_case_id          uuid NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    environment_id        uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    day                   date NOT NULL,
    total_runs            int NOT NULL CHECK (total_runs > 0),
    successful_runs       int NOT NULL CHECK (successful_runs BETWEEN 0 AND total_runs),
    avg_response_time_ms  double precision,
    p50_response_time_ms  double precision,
    p95_response_time_ms  double precision,
    p99_response_time_ms  double precision,
    success_rate          numeric(5, 2) NOT NULL CHECK (success_rate BETWEEN 0 AND 100),
    PRIMARY KEY (test_case_id, environment_id, day)
);
CREATE INDEX IF NOT EXISTS performance_metrics_recent
    ON performance_metrics (organization_id, day DESC);

-- Every decided execution of a test case, what flaky-test detection reads (the last N per
-- test case and environment). No foreign key to test_runs: history outlives the runs'
-- retention.
CREATE TABLE IF NOT EXISTS test_run_history (
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    test_case_id     uuid NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    environment_id   uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    run_id           uuid NOT NULL,
    status           text NOT NULL CHECK (status IN ('passed', 'failed', 'skipped')),
    category         text CHECK (category IN ('assertion', 'timeout', 'connection',
                         'server_error', 'dependency_skipped', 'template', 'capture')),
    attempts         int NOT NULL CHECK (attempts >= 0),
    duration_ms      double precision CHECK (duration_ms >= 0),
    executed_at      timestamptz NOT NULL,
    PRIMARY KEY (run_id, test_case_id)
);
CREATE INDEX IF NOT EXISTS test_run_history_lookup
    ON test_run_history (test_case_id, environment_id, executed_at DESC);

-- One per result that failed or was skipped for a reason (a failed dependency, a
-- template): the category and a fingerprint that groups the same failure across runs
-- (test case, category, message with numbers and ids blanked).
CREATE TABLE IF NOT EXISTS failure_analysis (
    result_id        uuid PRIMARY KEY REFERENCES test_results (id) ON DELETE CASCADE,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    test_case_id     uuid NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    run_id           uuid NOT NULL,
    category         text NOT NULL CHECK (category IN ('assertion', 'timeout', 'connection',
                         'server_error', 'dependency_skipped', 'template', 'capture')),
    message          text NOT NULL,
    fingerprint      text NOT NULL,
    occurred_at      timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS failure_analysis_by_fingerprint
    ON failure_analysis (organization_id, fingerprint, occurred_at DESC);
CREATE INDEX IF NOT EXISTS failure_analysis_by_case
    ON failure_analysis (test_case_id, occurred_at DESC);
INSERT INTO baton_schema_version (step, name) VALUES (3, 'read model')
ON CONFLICT (step) DO NOTHING;

-- step 4: row-level security by organization
--
-- A role that does not own these tables sees and writes only the rows of the organization
-- named by the setting baton.organization_id. The service sets it per transaction, as its
-- first statement: SELECT set_config('baton.organization_id', '<uuid>', true) (is_local:
-- it ends with the transaction, so a pooled connection never carries it to the next
-- request). Unset or empty, it matches nothing. The owner (the projector, migrations)
-- bypasses these policies: RLS is enabled, not forced.
CREATE OR REPLACE FUNCTION baton_current_organization() RETURNS uuid
LANGUAGE sql STABLE AS $$
    -- after a transaction-local set_config the setting reads '' rather than NULL
    SELECT nullif(current_setting('baton.organization_id', true), '')::uuid
$$;

DO $$
DECLARE
    t text;
BEGIN
    ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
    IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = current_schema()
                   AND tablename = 'organizations' AND policyname = 'baton_organization') THEN
        CREATE POLICY baton_organization ON organizations
            USING (id = baton_current_organization())
            WITH CHECK (id = baton_current_organization());
    END IF;
    FOREACH t IN ARRAY ARRAY['projects', 'environments', 'test_suites', 'test_cases',
            'test_dependencies', 'test_runs', 'test_execution_context', 'test_results',
            'test_result_details', 'performance_metrics', 'test_run_history',
            'failure_analysis'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = current_schema()
                       AND tablename = t AND policyname = 'baton_organization') THEN
            EXECUTE format('CREATE POLICY baton_organization ON %I '
                'USING (organization_id = baton_current_organization()) '
                'WITH CHECK (organization_id = baton_current_organization())', t);
        END IF;
    END LOOP;
END
$$;

INSERT INTO baton_schema_version (step, name) VALUES (4, 'row-level security by organization')
ON CONFLICT (step) DO NOTHING;

-- step 5: service tables and role
--
-- What the service (context_service) keeps that no event holds: API keys, projects, flow
-- files, environments with their variables, and the runs it started. No rebuild of the
-- read tables touches them, and none of them has a foreign key to a read table (the
-- projector's TRUNCATE would refuse, or cascade into them). Project, suite and
-- environment ids are the ones the projector derives from the same names
-- (events.projections.derive), so a suite here and its test_suites row share one id.
--
-- The service runs its queries as role baton_service, which owns nothing: row-level
-- security (step 4) is in force for it. Per transaction it runs
--   SELECT set_config('role', 'baton_service', true),
--          set_config('baton.organization_id', '<uuid>', true)
-- It may read the read tables and organizations, and write only its own tables; it has
-- no privilege on the event log (the service checks that a run is the caller's before it
-- reads its events as the owner). A later step that adds a read table grants it here too.
-- The role is cluster-wide: creating it tolerates another database's migration doing the
-- same at the same moment, and a server where the owner may not create roles (the service
-- then refuses to start, naming the role; the CLI is not concerned).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton_service') THEN
        CREATE ROLE baton_service NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
    WHEN insufficient_privilege THEN
        RAISE WARNING 'cannot create role baton_service: the Baton service will not start';
END
$$;

-- the key itself is never stored: sha256 of it, and its first characters for display
CREATE TABLE IF NOT EXISTS api_credentials (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name             text NOT NULL,
    prefix           text NOT NULL,
    key_hash         bytea NOT NULL UNIQUE,
    scopes           text[] NOT NULL
                     CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['read', 'run', 'admin']),
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_used_at     timestamptz,
    revoked_at       timestamptz
);
CREATE INDEX IF NOT EXISTS api_credentials_by_organization
    ON api_credentials (organization_id, created_at DESC);

CREATE TABLE IF NOT EXISTS service_projects (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (name <> ''),
    description      text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, name)
);

-- a flow file as uploaded; name is the flow's own name, which its runs record
CREATE TABLE IF NOT EXISTS service_suites (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id       uuid NOT NULL REFERENCES service_projects (id) ON DELETE CASCADE,
    name             text NOT NULL,
    filename         text NOT NULL,
    content          text NOT NULL,
    digest           text NOT NULL,
    tests            text[] NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

CREATE TABLE IF NOT EXISTS service_environments (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id       uuid NOT NULL REFERENCES service_projects (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (name <> ''),
    description      text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

-- a secret's value is ciphertext (events.secrets.Cipher), never clear text
CREATE TABLE IF NOT EXISTS environment_variables (
    environment_id   uuid NOT NULL REFERENCES service_environments (id) ON DELETE CASCADE,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (name <> ''),
    value            text NOT NULL,
    secret           boolean NOT NULL DEFAULT false,
    PRIMARY KEY (environment_id, name),
    CHECK (NOT secret OR value LIKE 'enc:v1:%')
);

-- The runs the service started: what to rerun them from, and the state of the task,
-- known before the projector files the run in test_runs. No foreign key from test_runs'
-- side: the run's own id is the link.
CREATE TABLE IF NOT EXISTS service_runs (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    suite_id         uuid REFERENCES service_suites (id) ON DELETE SET NULL,
    environment_id   uuid REFERENCES service_environments (id) ON DELETE SET NULL,
    rerun_of         uuid,
    tests            text[] NOT NULL DEFAULT '{}',
    tags             text[] NOT NULL DEFAULT '{}',
    -- what the request set (--var's counterpart), kept for a rerun; never a secret
    variables        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(variables) = 'object'),
    state            text NOT NULL
                     CHECK (state IN ('queued', 'running', 'finished', 'cancelled', 'error')),
    error            text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS service_runs_recent ON service_runs (organization_id, created_at DESC);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['api_credentials', 'service_projects', 'service_suites',
            'service_environments', 'environment_variables', 'service_runs'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = current_schema()
                       AND tablename = t AND policyname = 'baton_organization') THEN
            EXECUTE format('CREATE POLICY baton_organization ON %I '
                'USING (organization_id = baton_current_organization()) '
                'WITH CHECK (organization_id = baton_current_organization())', t);
        END IF;
    END LOOP;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton_service') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO baton_service', current_schema());
        GRANT SELECT ON organizations, projects, environments, test_suites, test_cases,
            test_dependencies, test_runs, test_execution_context, test_results,
            test_result_details, performance_metrics, test_run_history, failure_analysis
            TO baton_service;
        GRANT SELECT, INSERT, UPDATE, DELETE ON api_credentials, service_projects,
            service_suites, service_environments, environment_variables, service_runs
            TO baton_service;
        BEGIN
            -- a server's owner that is no superuser needs membership to SET ROLE
            EXECUTE format('GRANT baton_service TO %I', current_user);
        EXCEPTION
            WHEN OTHERS THEN NULL;
        END;
    END IF;
END
$$;

INSERT INTO baton_schema_version (step, name) VALUES (5, 'service tables and role')
ON CONFLICT (step) DO NOTHING;

-- step 6: Supabase Realtime publication
--
-- On Supabase, Realtime sends a table's changes (postgres_changes) only when the table is
-- in the publication supabase_realtime; `baton watch RUN_ID --supabase` follows a run
-- through the changes of test_runs and test_results. Elsewhere the publication does not
-- exist and this step does nothing. A publication made after this step ran (Realtime
-- enabled later) is filled by calling the function again: SELECT
-- baton_publish_to_supabase_realtime(); it returns the tables it added. A table that is a
-- member already (FOR ALL TABLES, or added by hand) is left alone. A role that may not
-- alter the publication gets a warning instead of a failed migration: the CLI and the
-- service work without Realtime.
CREATE OR REPLACE FUNCTION baton_publish_to_supabase_realtime() RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    added text[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'supabase_realtime') THEN
        RETURN added;
    END IF;
    FOREACH t IN ARRAY ARRAY['test_runs', 'test_results'] LOOP
        IF NOT EXISTS (SELECT FROM pg_publication_tables WHERE pubname = 'supabase_realtime'
                       AND schemaname = current_schema() AND tablename = t) THEN
            EXECUTE format('ALTER PUBLICATION supabase_realtime ADD TABLE %I.%I',
                           current_schema(), t);
            added := added || t;
        END IF;
    END LOOP;
    RETURN added;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE WARNING 'cannot add test_runs and test_results to publication supabase_realtime'
            ' (%): baton watch --supabase will see no changes', SQLERRM;
        RETURN '{}';
END
$$;
SELECT baton_publish_to_supabase_realtime();

INSERT INTO baton_schema_version (step, name) VALUES (6, 'Supabase Realtime publication')
ON CONFLICT (step) DO NOTHING;

-- step 7: log positions of decided executions
--
-- The flaky and performance rules (events.projections.detect) judge a test on its history
-- as of a run's completion: the executions decided at or before the log position of its
-- RunCompleted. A page of the projector can hold later decisions as well, and where pages
-- begin differs between a live projector and a rebuild, so time alone (recorded_at is when
-- an append's transaction began, not when it committed) would not decide the same twice.
-- Rows written before this step have no position: they count as older than any run
-- judged from now on, and `baton projections rebuild` fills the column in.
ALTER TABLE test_run_history ADD COLUMN IF NOT EXISTS position bigint;

INSERT INTO baton_schema_version (step, name)
VALUES (7, 'log positions of decided executions') ON CONFLICT (step) DO NOTHING;

-- step 8: newest executions first, in a fixed order
--
-- The rules of events.projections.detect take a test's newest executions (the last 30,
-- the last 5 passes) ordered by (executed_at, run_id): run_id breaks ties, so the same
-- history always gives the same set. With run_id in the index, that is a scan that stops
-- after N rows instead of a sort of the test's whole history for every judged test (a
-- rebuild's detection took half the time in a measurement with ~600 executions a test).
-- It serves every query test_run_history_lookup served, which would only slow writes now.
CREATE INDEX IF NOT EXISTS test_run_history_newest
    ON test_run_history (test_case_id, environment_id, executed_at DESC, run_id DESC);
DROP INDEX IF EXISTS test_run_history_lookup;

INSERT INTO baton_schema_version (step, name)
VALUES (8, 'newest executions first, in a fixed order') ON CONFLICT (step) DO NOTHING;

-- step 9: events record when they happened
--
-- recorded_at was now() of the append's transaction, so every event of one batched append
-- shared one timestamp: a test's request, response and verdict all read as the same
-- millisecond. The writer now stamps each event when it is emitted (a request when it is
-- sent, a response when it was received) and baton_append takes those times, in
-- microseconds since the Unix epoch, aligned with p_ids; a NULL array or entry means now().
-- The function body is step 2's with recorded_at added to the INSERT. The six-argument
-- form stays, for a process of an older Baton writing to a migrated database, and calls
-- this one without times.
CREATE OR REPLACE FUNCTION baton_append(
    p_streams text[], p_expected int[], p_counts int[],
    p_ids uuid[], p_types text[], p_data jsonb[], p_times int8[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    positions bigint[] := '{}';
    part bigint[];
    cur int;
    n int;
    found_n int;
    lo int := 1;
    hi int;
BEGIN
    PERFORM pg_advisory_xact_lock(7283540231093542001);
    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        n := p_counts[i];
        hi := lo + n - 1;
        SELECT s.version INTO cur FROM baton_streams s WHERE s.stream = p_streams[i];
        cur := coalesce(cur, 0);
        IF p_expected[i] <> -1 AND p_expected[i] <> cur THEN
            -- a conflict may be a re-send of an append that was written already
            SELECT array_agg(e.position ORDER BY t.ord), count(e.position)
              INTO part, found_n
              FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
              LEFT JOIN events e ON e.event_id = t.id AND e.stream = p_streams[i];
            IF found_n <> n THEN
                RAISE EXCEPTION 'stream % is at version %, the append expected %',
                        p_streams[i], cur, p_expected[i]
                    USING ERRCODE = 'BT001',
                          DETAIL = json_build_object('stream', p_streams[i],
                              'expected', p_expected[i], 'actual', cur)::text;
            END IF;
        ELSIF n = 0 THEN
            part := '{}';
        ELSE
            WITH ins AS (
                INSERT INTO events (stream, version, event_id, type, data, recorded_at)
                SELECT p_streams[i], cur + t.ord, t.id, t.ty, t.d,
                       coalesce(timestamptz 'epoch' + t.us * interval '1 microsecond', now())
                  FROM unnest(p_ids[lo:hi], p_types[lo:hi], p_data[lo:hi], p_times[lo:hi])
                       WITH ORDINALITY AS t(id, ty, d, us, ord)
                 ORDER BY t.ord
                ON CONFLICT (event_id) DO NOTHING
                RETURNING event_id, position
            )
            -- counted from ins itself: an id repeated in the call joins its one row twice
            SELECT array_agg(ins.position ORDER BY t.ord), (SELECT count(*) FROM ins)
              INTO part, found_n
              FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
              LEFT JOIN ins ON ins.event_id = t.id;
            IF found_n = n THEN
                INSERT INTO baton_streams AS s (stream, version, first_position)
                VALUES (p_streams[i], cur + n, part[1])
                ON CONFLICT (stream) DO UPDATE SET version = excluded.version;
            ELSIF found_n = 0 THEN
                -- every id stored already: a re-send of an append with any version
                SELECT array_agg(e.position ORDER BY t.ord), count(e.position)
                  INTO part, found_n
                  FROM unnest(p_ids[lo:hi]) WITH ORDINALITY AS t(id, ord)
                  LEFT JOIN events e ON e.event_id = t.id AND e.stream = p_streams[i];
            END IF;
            IF found_n <> n THEN
                RAISE EXCEPTION 'an append to stream % repeats an event id, or mixes new ids '
                        'with ids that are stored already (here or in another stream)', p_streams[i]
                    USING ERRCODE = 'BT002';
            END IF;
        END IF;
        positions := positions || part;
        lo := hi + 1;
    END LOOP;
    IF array_length(positions, 1) > 0 THEN
        -- delivered when (and only if) the transaction commits
        PERFORM pg_notify('baton_events', (SELECT max(p) FROM unnest(positions) AS p)::text);
    END IF;
    RETURN positions;
END
$$;

CREATE OR REPLACE FUNCTION baton_append(
    p_streams text[], p_expected int[], p_counts int[],
    p_ids uuid[], p_types text[], p_data jsonb[]
) RETURNS bigint[]
LANGUAGE sql AS $$
    SELECT baton_append(p_streams, p_expected, p_counts, p_ids, p_types, p_data, NULL::int8[])
$$;

INSERT INTO baton_schema_version (step, name)
VALUES (9, 'events record when they happened') ON CONFLICT (step) DO NOTHING;

-- step 10: run owners and their heartbeats
--
-- Every process that runs runs (`baton run`, the service) is an owner: a row here that it
-- beats (beat_at = now()) every few seconds while it lives. A run it starts is claimed in
-- baton_run_owners in the transaction that appends its RunStarted, and released in the
-- one that appends its RunCompleted or RunCancelled, so a claim exists exactly while the
-- run is open in the log. A run whose owner stopped beating (killed, its machine gone) is
-- ended by whichever process sweeps next: RunCancelled with the reason "interrupted"
-- (events.owners). Times are the database's, so the owners' clocks need not agree.
CREATE TABLE IF NOT EXISTS baton_owners (
    id          uuid PRIMARY KEY,
    host        text NOT NULL,
    pid         int NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS baton_run_owners (
    stream      text COLLATE "C" PRIMARY KEY,
    -- no foreign key: an owner's row may go (a clean exit) before a run it could not end
    owner       uuid NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS baton_run_owners_owner ON baton_run_owners (owner);

INSERT INTO baton_schema_version (step, name)
VALUES (10, 'run owners and their heartbeats') ON CONFLICT (step) DO NOTHING;

-- step 11: service health checks and test sessions
--
-- One row per ServiceHealthChecked event (stream health-<id>, a check before a run of
-- `baton run`): id is the event's id, checked_at its recorded_at, so a rebuild gives the
-- same rows. No foreign key to projects: an aborted invocation checks without a run, and
-- the projects row comes with a project's first run.
CREATE TABLE IF NOT EXISTS service_health_checks (
    id                uuid PRIMARY KEY,
    organization_id   uuid NOT NULL,
    project_id        uuid NOT NULL,
    suite             text NOT NULL,
    service           text NOT NULL,
    url               text NOT NULL,
    status            text NOT NULL
        CHECK (status IN ('healthy', 'degraded', 'unhealthy', 'timeout')),
    attempts          int NOT NULL,
    response_time_ms  float8,
    status_code       int,
    error             text NOT NULL DEFAULT '',
    session_id        uuid,
    position          bigint NOT NULL,
    checked_at        timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS service_health_checks_latest
    ON service_health_checks (project_id, service, checked_at DESC, id DESC);

-- A test session (stream session-<id>, events.sessions) as its events leave it, and the
-- runs admitted to it. Times are the events' recorded_at.
CREATE TABLE IF NOT EXISTS test_sessions (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL,
    project_id       uuid NOT NULL,
    name             text NOT NULL,
    description      text NOT NULL DEFAULT '',
    tester           text NOT NULL DEFAULT '',
    status           text NOT NULL
        CHECK (status IN ('created', 'active', 'paused', 'completed', 'failed')),
    reason           text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    ended_at         timestamptz
);
CREATE INDEX IF NOT EXISTS test_sessions_status ON test_sessions (organization_id, status);

CREATE TABLE IF NOT EXISTS session_runs (
    session_id       uuid NOT NULL REFERENCES test_sessions (id) ON DELETE CASCADE,
    run_id           uuid NOT NULL,
    organization_id  uuid NOT NULL,
    added_at         timestamptz NOT NULL,
    PRIMARY KEY (session_id, run_id)
);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['service_health_checks', 'test_sessions', 'session_runs'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = current_schema()
                       AND tablename = t AND policyname = 'baton_organization') THEN
            EXECUTE format('CREATE POLICY baton_organization ON %I '
                'USING (organization_id = baton_current_organization()) '
                'WITH CHECK (organization_id = baton_current_organization())', t);
        END IF;
    END LOOP;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton_service') THEN
        GRANT SELECT ON service_health_checks, test_sessions, session_runs TO baton_service;
    END IF;
END
$$;

INSERT INTO baton_schema_version (step, name)
VALUES (11, 'service health checks and test sessions') ON CONFLICT (step) DO NOTHING;

-- step 12: daily rollups of runs and failures
--
-- What the analytics endpoint reads instead of every run and failure of a period (measured
-- in bench/ANALYTICS.md: over 1,000,000 results, run durations took 265 ms for 30 days
-- from test_runs and failure categories 151 ms from failure_analysis). Like
-- performance_metrics, each row is recomputed from its day's rows whenever one of them
-- changes (events.projections.metrics), so it is exact and cannot drift.
-- run_metrics: the runs of one suite in one environment that ended on one UTC day.
CREATE TABLE IF NOT EXISTS run_metrics (
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id       uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    suite_id         uuid NOT NULL REFERENCES test_suites (id) ON DELETE CASCADE,
    environment_id   uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    day              date NOT NULL,
    runs             int NOT NULL CHECK (runs > 0),
    passed           int NOT NULL CHECK (passed BETWEEN 0 AND runs),
    avg_duration_ms  double precision,
    p50_duration_ms  double precision,
    p95_duration_ms  double precision,
    max_duration_ms  double precision,
    PRIMARY KEY (suite_id, environment_id, day)
);
CREATE INDEX IF NOT EXISTS run_metrics_by_project ON run_metrics (project_id, day);
-- the day's ended runs of a suite in an environment, for the recomputation
CREATE INDEX IF NOT EXISTS test_runs_ended
    ON test_runs (suite_id, environment_id, ended_at) WHERE ended_at IS NOT NULL;

-- failure_metrics: the results of one test case in one environment decided on one UTC day
-- with a failure category (failed, or skipped for a reason), per category.
CREATE TABLE IF NOT EXISTS failure_metrics (
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    test_case_id     uuid NOT NULL REFERENCES test_cases (id) ON DELETE CASCADE,
    environment_id   uuid NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    day              date NOT NULL,
    category         text NOT NULL CHECK (category IN ('assertion', 'timeout', 'connection',
                         'server_error', 'dependency_skipped', 'template', 'capture')),
    failures         int NOT NULL CHECK (failures > 0),
    last_at          timestamptz NOT NULL,
    PRIMARY KEY (test_case_id, environment_id, day, category)
);
-- a day's categorised results of a test, for the recomputation: a few percent of them
CREATE INDEX IF NOT EXISTS test_results_categorised
    ON test_results (test_case_id, environment_id, ended_at) WHERE category IS NOT NULL;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['run_metrics', 'failure_metrics'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = current_schema()
                       AND tablename = t AND policyname = 'baton_organization') THEN
            EXECUTE format('CREATE POLICY baton_organization ON %I '
                'USING (organization_id = baton_current_organization()) '
                'WITH CHECK (organization_id = baton_current_organization())', t);
        END IF;
    END LOOP;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton_service') THEN
        GRANT SELECT ON run_metrics, failure_metrics TO baton_service;
    END IF;
END
$$;

-- the rollups of what the log holds already
INSERT INTO run_metrics (organization_id, project_id, suite_id, environment_id, day, runs,
    passed, avg_duration_ms, p50_duration_ms, p95_duration_ms, max_duration_ms)
SELECT organization_id, project_id, suite_id, environment_id,
    (ended_at AT TIME ZONE 'UTC')::date, count(*), count(*) FILTER (WHERE status = 'passed'),
    round(avg(duration_ms::numeric), 3)::float8,
    round(percentile_cont(0.50) WITHIN GROUP (ORDER BY duration_ms)::numeric, 3)::float8,
    round(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::numeric, 3)::float8,
    max(duration_ms)
FROM test_runs WHERE ended_at IS NOT NULL
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT DO NOTHING;
INSERT INTO failure_metrics (organization_id, test_case_id, environment_id, day, category,
    failures, last_at)
SELECT organization_id, test_case_id, environment_id, (ended_at AT TIME ZONE 'UTC')::date,
    category, count(*), max(ended_at)
FROM test_results WHERE category IS NOT NULL AND ended_at IS NOT NULL
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT DO NOTHING;

INSERT INTO baton_schema_version (step, name)
VALUES (12, 'daily rollups of runs and failures') ON CONFLICT (step) DO NOTHING;

-- step 13: retention policies and monthly metrics
--
-- What `baton retention apply` reads and keeps (events.retention, docs/retention.md).
-- retention_policies: a project's own windows; a NULL column takes the default (passed
-- runs 90 days, failed 180, monthly metrics 730, contexts 24 hours after the run ends).
-- Keyed by project name: the same name in two organizations shares its policy.
CREATE TABLE IF NOT EXISTS retention_policies (
    project        text PRIMARY KEY CHECK (project <> ''),
    passed_days    int CHECK (passed_days > 0),
    failed_days    int CHECK (failed_days > 0),
    metrics_days   int CHECK (metrics_days > 0),
    context_hours  int CHECK (context_hours > 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Runs whose context row retention removed: the projector does not write them again, so a
-- rebuild gives back what apply left (the log still holds those runs' events).
CREATE TABLE IF NOT EXISTS baton_expired_contexts (
    run_id      uuid PRIMARY KEY,
    expired_at  timestamptz NOT NULL
);

-- One row per test case, environment and UTC month, taken from test_results before the
-- first of that month's runs leaves for the archive. Not a projection: no event derives it,
-- a rebuild leaves it, and it names its test, suite and project in clear because it
-- outlives their catalog rows (no foreign keys for the same reason).
CREATE TABLE IF NOT EXISTS performance_metrics_monthly (
    organization_id       uuid NOT NULL,
    project_id            uuid NOT NULL,
    project               text NOT NULL,
    suite                 text NOT NULL,
    test_name             text NOT NULL,
    test_case_id          uuid NOT NULL,
    environment_id        uuid NOT NULL,
    environment           text NOT NULL,
    month                 date NOT NULL CHECK (extract(day FROM month) = 1),
    total_runs            int NOT NULL CHECK (total_runs > 0),
    successful_runs       int NOT NULL CHECK (successful_runs BETWEEN 0 AND total_runs),
    avg_response_time_ms  double precision,
    p50_response_time_ms  double precision,
    p95_response_time_ms  double precision,
    p99_response_time_ms  double precision,
    success_rate          numeric(5, 2) NOT NULL,
    PRIMARY KEY (test_case_id, environment_id, month)
);
CREATE INDEX IF NOT EXISTS performance_metrics_monthly_by_project
    ON performance_metrics_monthly (project_id, month);

DO $$
BEGIN
    ALTER TABLE performance_metrics_monthly ENABLE ROW LEVEL SECURITY;
    IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = current_schema()
                   AND tablename = 'performance_metrics_monthly'
                   AND policyname = 'baton_organization') THEN
        CREATE POLICY baton_organization ON performance_metrics_monthly
            USING (organization_id = baton_current_organization())
            WITH CHECK (organization_id = baton_current_organization());
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton_service') THEN
        GRANT SELECT ON performance_metrics_monthly TO baton_service;
    END IF;
END
$$;

INSERT INTO baton_schema_version (step, name)
VALUES (13, 'retention policies and monthly metrics') ON CONFLICT (step) DO NOTHING;

-- step 14: queued service runs for every instance
--
-- With BATON_QUEUE_URL several `baton serve` instances share this table, and every one of
-- them looks, every few seconds, for queued runs whose end it has not recorded, whichever
-- instance queued them: the partial index keeps that look cheap.
CREATE INDEX IF NOT EXISTS service_runs_queued ON service_runs (created_at)
    WHERE state = 'queued';

INSERT INTO baton_schema_version (step, name)
VALUES (14, 'queued service runs for every instance') ON CONFLICT (step) DO NOTHING;

-- step 15: the jobs of queued service runs
--
-- An instance killed between recording a run here and putting its job on the queue leaves
-- a queued run no worker will ever take. Any instance that finds one (no key on the queue
-- says its job was queued, a while after it was recorded) queues its job again; any
-- instance asked to cancel a queued run no worker has begun ends it by appending the
-- RunStarted its job carries and a RunCancelled at version 0. The job is kept here as the
-- instance made it (msgspec JSON of orchestrator.queue.QueuedJob, the
-- run in it sealed with the secret key as on the queue; '' for runs recorded before this
-- step, which are never queued again). A run's job is emptied once its end is recorded.
ALTER TABLE service_runs ADD COLUMN IF NOT EXISTS job text NOT NULL DEFAULT '';

INSERT INTO baton_schema_version (step, name)
VALUES (15, 'the jobs of queued service runs') ON CONFLICT (step) DO NOTHING;
