-- Capacity: resource snapshots, scheduled missions and the current risk level per series.

-- One row per observation. The primary key is also the index every read uses: a
-- (satellite, resource) series in time order, or a time range of it. A re-sent snapshot
-- (same satellite, resource and timestamp) conflicts and is stored once.
CREATE TABLE capacity_snapshots (
    satellite_id   text NOT NULL CHECK (satellite_id <> ''),
    resource_type  smallint NOT NULL CHECK (resource_type BETWEEN 1 AND 4),
    snapshot_time  timestamptz NOT NULL,
    value          double precision NOT NULL CHECK (value >= 0 AND value < 'Infinity'),
    unit           text NOT NULL CHECK (unit <> ''),
    PRIMARY KEY (satellite_id, resource_type, snapshot_time)
);

-- Scheduled missions; the same mission_id replaces the previous version.
-- resource_impacts maps the resource number (as text) to the planned use (+) or gain (-).
CREATE TABLE capacity_missions (
    mission_id        text PRIMARY KEY CHECK (mission_id <> ''),
    satellite_id      text NOT NULL CHECK (satellite_id <> ''),
    start_time        timestamptz NOT NULL,
    end_time          timestamptz NOT NULL,
    resource_impacts  jsonb NOT NULL DEFAULT '{}',
    description       text NOT NULL DEFAULT '',
    updated_time      timestamptz NOT NULL DEFAULT now(),
    CHECK (end_time > start_time)
);
CREATE INDEX capacity_missions_by_satellite ON capacity_missions (satellite_id, start_time);

-- The risk level last reported (by a risk_changed event) for each series. A series without a
-- row counts as NOMINAL, so only series that were ever at risk have one.
CREATE TABLE capacity_risk_levels (
    satellite_id    text NOT NULL,
    resource_type   smallint NOT NULL CHECK (resource_type BETWEEN 1 AND 4),
    risk_level      smallint NOT NULL CHECK (risk_level BETWEEN 1 AND 4),
    days_remaining  double precision,
    changed_time    timestamptz NOT NULL,
    PRIMARY KEY (satellite_id, resource_type)
);
