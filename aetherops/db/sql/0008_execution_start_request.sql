-- StartExecution's request id is scoped by runbook and caller (`_request_execution_id` in
-- aetherops.services.runbook): the same id from another caller, or for another runbook, is another
-- request. Unique on the id alone, such a start was refused and answered with nothing.
DROP INDEX IF EXISTS executions_start_request;
CREATE UNIQUE INDEX executions_start_request ON executions (runbook_id, triggered_by, start_request_id)
    WHERE start_request_id IS NOT NULL;
