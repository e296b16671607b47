-- Correlation's hot table, cheaper to write. Every ingested alert is one row of `alerts`, and under
-- an alert storm most of PostgreSQL's time per alert went to the per-row work of this table's keys.

-- Ids are opaque keys, so they compare bytewise. Under the database's default collation (a libc
-- locale such as C.UTF-8 or en_US.UTF-8) every B-tree comparison went through strcoll; with "C" it
-- is a memcmp. Orderings by these columns are only tie-breaks of keyset pagination, which needs a
-- total order, not a linguistic one.
ALTER TABLE alerts DROP CONSTRAINT alerts_cluster_id_fkey;
ALTER TABLE clusters ALTER COLUMN cluster_id TYPE text COLLATE "C";
ALTER TABLE alerts
    ALTER COLUMN alert_id TYPE text COLLATE "C",
    ALTER COLUMN cluster_id TYPE text COLLATE "C",
    ALTER COLUMN duplicate_of TYPE text COLLATE "C",
    ALTER COLUMN tracking_id TYPE text COLLATE "C";

-- Every alert still names a stored cluster, checked once per statement instead of once per row.
-- The foreign key's check was a query per inserted row that also locked the cluster's row (FOR KEY
-- SHARE): a storm's batch locked its incident's row a thousand times. This trigger probes each
-- distinct cluster of the statement once. Clusters are never deleted, so no lock is needed to keep
-- them. The LIMIT keeps the probe a primary-key lookup per cluster: the planner cannot turn it into
-- a hash join that reads the whole table when it has no statistics.
CREATE FUNCTION alerts_check_clusters() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.cluster_id INTO missing
    FROM (SELECT DISTINCT cluster_id FROM inserted_alerts) AS n
    WHERE NOT EXISTS (SELECT FROM (SELECT FROM clusters c WHERE c.cluster_id = n.cluster_id LIMIT 1) AS found)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'alerts name cluster %, which is not stored', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER alerts_check_clusters AFTER INSERT ON alerts REFERENCING NEW TABLE AS inserted_alerts
    FOR EACH STATEMENT EXECUTE FUNCTION alerts_check_clusters();
