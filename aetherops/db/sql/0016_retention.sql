-- Retention (aetherops/db/retention.py): what each round looks for, found from an index instead of a scan
-- of tables that only grow. Closed incidents in the order they closed; idempotency records by age.
CREATE INDEX clusters_closed_by_time ON clusters (closed_time, cluster_id) WHERE status = 'CLOSED';
CREATE INDEX idempotency_by_created ON idempotency (created_time);
