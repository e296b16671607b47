-- Who acknowledged an incident (AcknowledgeCluster), when, and their note. Written only by the
-- acknowledgement itself: the ingest path's cluster updates leave these columns alone, as they do the
-- close columns. NULL until acknowledged; no defaults, so adding the columns rewrites nothing.
ALTER TABLE clusters
    ADD COLUMN acknowledge_time timestamptz,
    ADD COLUMN acknowledged_by text,
    ADD COLUMN acknowledge_note text;
