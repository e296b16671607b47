// Calls a running AetherOps server through the generated client over gRPC.
// The server's port comes from AETHEROPS_TEST_PORT (tests/integration/typescript_client_test.py
// starts the server and runs `node --test` with it set).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { createAetherOpsClients } from "../src/index.js";

const port = process.env.AETHEROPS_TEST_PORT;
if (!port) {
  throw new Error("AETHEROPS_TEST_PORT is not set: run this test through tests/integration/typescript_client_test.py");
}
const clients = createAetherOpsClients(`http://127.0.0.1:${port}`, { token: process.env.AETHEROPS_TOKEN });

test("IngestAlert then GetCluster returns the alert's cluster", async () => {
  const alertId = `ts-${randomUUID()}`;
  const ingested = await clients.correlation.ingestAlert({
    alert: {
      alertId,
      satelliteId: "SAT-TS1",
      subsystem: "power",
      severity: 4,
      timestamp: timestampFromDate(new Date()),
      message: "bus undervoltage (from the TypeScript client)",
      labels: { source: "node-test" },
    },
  });
  assert.ok(ingested.clusterId, "IngestAlert answers with a cluster id");

  const { cluster } = await clients.correlation.getCluster({ clusterId: ingested.clusterId });
  assert.ok(cluster);
  assert.equal(cluster.clusterId, ingested.clusterId);
  assert.ok(cluster.alerts.some((a) => a.alertId === alertId), "the cluster holds the alert");
  assert.ok(cluster.satelliteIds.includes("SAT-TS1"));
});

test("GetCluster of an unknown id is NOT_FOUND", async () => {
  await assert.rejects(
    clients.correlation.getCluster({ clusterId: randomUUID() }),
    (err) => err instanceof ConnectError && err.code === Code.NotFound,
  );
});

test("GetFleetRiskSummary answers with groups and a compute time", async () => {
  const headers = new Headers();
  const summary = await clients.capacity.getFleetRiskSummary(
    {},
    { headers: { "x-tracking-id": "ts-risk-1" }, onTrailer: (h) => h.forEach((v, k) => headers.set(k, v)) },
  );
  assert.ok(summary.satelliteCount >= 0);
  assert.ok(Array.isArray(summary.groups));
  assert.ok(summary.computeTime, "compute_time is set");
  assert.equal(headers.get("x-tracking-id"), "ts-risk-1", "the tracking id comes back in the response trailers");
});
