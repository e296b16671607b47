-- Platform tables: the transactional outbox and idempotency records.

-- Events written in the same transaction as the state change they describe;
-- the relay publishes them to JetStream in id order and stamps published_time.
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    event_id        uuid NOT NULL UNIQUE,
    subject         text NOT NULL,
    aggregate_id    text NOT NULL,
    payload         bytea NOT NULL,
    tracking_id     text NOT NULL DEFAULT '',
    created_time    timestamptz NOT NULL DEFAULT now(),
    published_time  timestamptz,
    attempts        integer NOT NULL DEFAULT 0
);
-- The relay only ever looks at unpublished rows.
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_time IS NULL;

-- Responses of mutating RPCs by request_id, so a retried request answers as the first did.
CREATE TABLE idempotency (
    scope         text NOT NULL,
    request_id    text NOT NULL,
    response      jsonb NOT NULL,
    created_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, request_id)
);
