-- Baton's PostgreSQL schema: the one definition, applied on every connect.
--
-- Every statement is idempotent (IF NOT EXISTS, CREATE OR REPLACE), so applying the file
-- twice changes nothing. Each step is numbered, and the step records itself in
-- baton_schema_version when it is first applied. A later change is a new step appended at
-- the end, never an edit of an applied table definition.
-- The application (events.postgres.apply_schema) runs this file in one transaction under an
-- advisory lock, so processes starting together do not race on CREATE ... IF NOT EXISTS.

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
