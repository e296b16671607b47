-- Start-up reloads every execution with work left: RUNNING ones, and those whose rollback was under
-- way when the server stopped (the execution is FAILED or COMPLETED by then, so a status = 'RUNNING'
-- index left the rest of such a rollback undone for good). The index row's finished_time stays
-- NULL until the execution's last event is EXECUTION_FINISHED, so "unsettled" is finished_time IS NULL.
DROP INDEX IF EXISTS executions_unfinished;
CREATE INDEX executions_unfinished ON executions (execution_id) WHERE finished_time IS NULL;
