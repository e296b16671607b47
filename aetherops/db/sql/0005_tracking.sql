-- Tracking ids on runbook executions and their audit rows, and the indexes the query RPCs
-- (ListAlerts, ListExecutions) and `aetherops trace` read by.

-- The tracking id of the request that started the execution, or of the incident event that did.
ALTER TABLE executions ADD COLUMN tracking_id text NOT NULL DEFAULT '';
-- The tracking id of the request that caused each transition (StartExecution, ExecuteNextStep,
-- ApproveStep, RollbackExecution, the incident event); work no request asked for (a driver resumed
-- after a restart, an expiring approval) carries the execution's own.
ALTER TABLE execution_events ADD COLUMN tracking_id text NOT NULL DEFAULT '';

-- ListExecutions by tracking id: executions started under it, plus those a request under it changed.
CREATE INDEX executions_by_tracking ON executions (tracking_id) WHERE tracking_id <> '';
CREATE INDEX execution_events_by_tracking ON execution_events (tracking_id) WHERE tracking_id <> '';
-- ListExecutions pages newest start first: unfiltered (or by status), by incident, by runbook.
CREATE INDEX executions_by_start ON executions (started_time DESC, execution_id DESC);
DROP INDEX executions_by_incident;
CREATE INDEX executions_by_incident ON executions (incident_id, started_time DESC, execution_id DESC)
    WHERE incident_id <> '';
CREATE INDEX executions_by_runbook ON executions (runbook_id, started_time DESC, execution_id DESC);

-- ListAlerts pages oldest alert first, duplicates included: by tracking id (replacing the plain index
-- of 0002), and by cluster: alerts_by_cluster holds the non-duplicates, this one the duplicates. Two
-- partial indexes rather than one full index, so every alert row still updates one cluster index
-- (a full index on every row measurably slowed COPY into alerts).
DROP INDEX alerts_by_tracking;
CREATE INDEX alerts_by_tracking ON alerts (tracking_id, alert_time, alert_id) WHERE tracking_id <> '';
CREATE INDEX alerts_duplicates_by_cluster ON alerts (cluster_id, alert_time, alert_id) WHERE duplicate_of IS NOT NULL;
