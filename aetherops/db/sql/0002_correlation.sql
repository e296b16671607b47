-- Correlation: incident clusters and the alerts in them.

CREATE TABLE clusters (
    cluster_id            text PRIMARY KEY,
    status                text NOT NULL CHECK (status IN ('OPEN', 'CLOSED')),
    root_cause_alert_id   text,
    root_cause_confidence double precision NOT NULL DEFAULT 0,
    satellites            text[] NOT NULL DEFAULT '{}',
    subsystems            text[] NOT NULL DEFAULT '{}',
    max_severity          integer NOT NULL DEFAULT 0,
    first_alert_time      timestamptz NOT NULL,
    last_alert_time       timestamptz NOT NULL,
    opened_time           timestamptz NOT NULL,
    closed_time           timestamptz,
    close_reason          text NOT NULL DEFAULT '',
    closed_by             text NOT NULL DEFAULT '',
    alert_count           integer NOT NULL DEFAULT 0,
    duplicate_count       integer NOT NULL DEFAULT 0,
    tracking_id           text NOT NULL DEFAULT ''
);
-- Restart rebuilds the engine from open clusters active within the window; listing pages by activity.
CREATE INDEX clusters_open_activity ON clusters (last_alert_time DESC, cluster_id) WHERE status = 'OPEN';

-- Every ingested alert, duplicates included (duplicate_of set), so a re-sent alert_id
-- answers with the same cluster even after its cluster left the engine's memory.
CREATE TABLE alerts (
    alert_id       text PRIMARY KEY,
    cluster_id     text NOT NULL REFERENCES clusters (cluster_id),
    satellite_id   text NOT NULL,
    subsystem      text NOT NULL,
    severity       integer NOT NULL CHECK (severity BETWEEN 1 AND 5),
    alert_time     timestamptz NOT NULL,
    message        text NOT NULL DEFAULT '',
    labels         jsonb NOT NULL DEFAULT '{}',
    duplicate_of   text,
    tracking_id    text NOT NULL DEFAULT '',
    ingested_time  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_by_cluster ON alerts (cluster_id, alert_time) WHERE duplicate_of IS NULL;
CREATE INDEX alerts_by_tracking ON alerts (tracking_id) WHERE tracking_id <> '';
