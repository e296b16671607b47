-- Runbook service: versioned definitions, the execution event store and an index of executions.

-- Every version of every runbook; a changed definition under an existing id is version N+1.
CREATE TABLE runbooks (
    runbook_id    text NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    definition    jsonb NOT NULL,
    created_time  timestamptz NOT NULL,
    PRIMARY KEY (runbook_id, version)
);

-- The source of truth: each execution is an append-only stream. The primary key makes appending
-- seq N+1 twice impossible, which is the optimistic-concurrency check across processes.
CREATE TABLE execution_events (
    execution_id    text NOT NULL,
    seq             integer NOT NULL CHECK (seq >= 1),
    type            text NOT NULL,
    occurred_time   timestamptz NOT NULL,
    actor           text NOT NULL,
    data            jsonb NOT NULL,
    schema_version  integer NOT NULL,
    PRIMARY KEY (execution_id, seq)
);

-- A projection of the streams, written in the same transaction as their events: what start-up
-- reloads (unfinished executions), and the idempotency key of StartExecution.
CREATE TABLE executions (
    execution_id        text PRIMARY KEY,
    runbook_id          text NOT NULL,
    runbook_version     integer NOT NULL,
    triggered_by        text NOT NULL,
    status              text NOT NULL,
    version             integer NOT NULL,
    current_step_index  integer NOT NULL DEFAULT 0,
    incident_id         text NOT NULL DEFAULT '',
    start_request_id    text,
    started_time        timestamptz NOT NULL,
    finished_time       timestamptz,
    updated_time        timestamptz NOT NULL,
    FOREIGN KEY (runbook_id, runbook_version) REFERENCES runbooks (runbook_id, version)
);
CREATE UNIQUE INDEX executions_start_request ON executions (start_request_id) WHERE start_request_id IS NOT NULL;
-- Start-up reloads only what is still running.
CREATE INDEX executions_unfinished ON executions (execution_id) WHERE status = 'RUNNING';
CREATE INDEX executions_by_incident ON executions (incident_id) WHERE incident_id <> '';
