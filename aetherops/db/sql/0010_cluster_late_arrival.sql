-- A satellite out of contact downlinks what it logged at the next pass, hours late. The engine keeps
-- the incident such a batch opened or joined in memory for a window after the batch's last alert
-- arrived (`IncidentCluster._late_touch`), so the rest of the batch joins it. A restart rebuilt only
-- clusters whose last alert was within the window, so the rest of a batch that straddled a restart
-- opened a second incident. This is the arrival (server clock) of the last alert that joined the
-- cluster already older than the window; NULL when none did. A cluster opened by such an alert has
-- it at opened_time, which is not repeated here. No default: adding the column rewrites nothing.
ALTER TABLE clusters ADD COLUMN late_arrival_time timestamptz;
