-- The outbox keeps a week of published events (AETHEROPS_OUTBOX_RETENTION_S), and every event was
-- also an entry in a UNIQUE index on its random UUID: each insert landed on a random page of an index
-- that only grows, so its cost rose with the table. Nothing looks events up by event_id; it is the
-- Nats-Msg-Id that JetStream deduplicates on, and it is a fresh UUID4 per event. In a bench that
-- opens an incident per alert (an event each), PostgreSQL's CPU per alert was 2 µs lower without
-- the index on a young table and 5-8 µs lower (of 35-40) after 300,000 events.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_event_id_key;
