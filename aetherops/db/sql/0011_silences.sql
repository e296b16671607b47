-- Silences (aetherops/silences.py): windows in which the alerts an operator expects are kept out of
-- incidents. Ids start with their creation time (aetherops.ids): listings page by id, newest first.
CREATE TABLE silences (
    silence_id    text COLLATE "C" PRIMARY KEY,
    satellite_ids text[] NOT NULL DEFAULT '{}',
    subsystems    text[] NOT NULL DEFAULT '{}',
    labels        jsonb NOT NULL DEFAULT '{}',
    start_time    timestamptz NOT NULL,
    end_time      timestamptz NOT NULL,
    comment       text NOT NULL,
    created_by    text NOT NULL DEFAULT '',
    create_time   timestamptz NOT NULL,
    expired_by    text NOT NULL DEFAULT '',
    expire_time   timestamptz,
    CHECK (end_time > start_time OR expire_time IS NOT NULL)
);
-- What the ingest path loads (those within reach of late alerts) and what listings show by default.
CREATE INDEX silences_by_end ON silences (end_time);

-- A silenced alert is stored (a retry answers the same; listings show it) but is in no cluster.
-- Existing rows are untouched: dropping NOT NULL and adding a column without a default rewrite nothing.
ALTER TABLE alerts ALTER COLUMN cluster_id DROP NOT NULL;
ALTER TABLE alerts ADD COLUMN silence_id text COLLATE "C";
-- Checked for new rows only (NOT VALID): every stored alert before this has its cluster.
ALTER TABLE alerts ADD CONSTRAINT alerts_cluster_or_silence
    CHECK (cluster_id IS NOT NULL OR silence_id IS NOT NULL) NOT VALID;
CREATE INDEX alerts_by_silence ON alerts (silence_id, alert_time, alert_id) WHERE silence_id IS NOT NULL;

-- Migration 0006's check, skipping the alerts that are in no cluster.
CREATE OR REPLACE FUNCTION alerts_check_clusters() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    SELECT n.cluster_id INTO missing
    FROM (SELECT DISTINCT cluster_id FROM inserted_alerts WHERE cluster_id IS NOT NULL) AS n
    WHERE NOT EXISTS (SELECT FROM (SELECT FROM clusters c WHERE c.cluster_id = n.cluster_id LIMIT 1) AS found)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'alerts name cluster %, which is not stored', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
