-- Expiring a silence that had not started used to move only its end, to before its start: such a
-- silence covered nothing, but listed a window running backwards and stayed "not yet ended" until its
-- start passed. It now starts and ends when it was expired (aetherops.silences.Silence.expired); the
-- silences stored before get the same window (their end is that moment), and no window runs backwards.
UPDATE silences SET start_time = end_time WHERE end_time < start_time;
ALTER TABLE silences ADD CONSTRAINT silences_end_not_before_start CHECK (end_time >= start_time);
