-- The alert that opened the cluster. IngestAlert answers cluster_opened=true for it, and a retry of
-- that alert (the first answer lost) must say the same: a caller that pages on "new incident" would
-- otherwise miss the page. NULL for clusters stored before this column (a retry of their opening
-- alert answers cluster_opened=false, as it did). No default: adding the column rewrites nothing.
ALTER TABLE clusters ADD COLUMN opened_by_alert_id text;
