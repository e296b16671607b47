// Entry point of the AetherOps TypeScript client: one typed client per service over a
// gRPC (HTTP/2) transport. The message and service definitions in ./gen are generated
// from ../../proto by `npm run generate` (buf + local protoc-gen-es); do not edit them.
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { CapacityService } from "./gen/aetherops/capacity/v1/capacity_pb.js";
import { CorrelationService } from "./gen/aetherops/correlation/v1/correlation_pb.js";
import { RunbookService } from "./gen/aetherops/runbook/v1/runbook_pb.js";

export * as capacity from "./gen/aetherops/capacity/v1/capacity_pb.js";
export * as common from "./gen/aetherops/common/v1/common_pb.js";
export * as correlation from "./gen/aetherops/correlation/v1/correlation_pb.js";
export * as runbook from "./gen/aetherops/runbook/v1/runbook_pb.js";

/**
 * Clients for the three services sharing one HTTP/2 connection.
 * @param {string} baseUrl e.g. "http://127.0.0.1:50051"
 * @param {{ token?: string, timeoutMs?: number }} [options]
 */
export function createAetherOpsClients(baseUrl, options = {}) {
  const interceptors = [];
  if (options.token) {
    // Same metadata the Python SDK sends; the server reads it as a bearer token.
    interceptors.push((next) => (req) => {
      req.header.set("authorization", `Bearer ${options.token}`);
      return next(req);
    });
  }
  const transport = createGrpcTransport({
    baseUrl,
    httpVersion: "2",
    interceptors,
    defaultTimeoutMs: options.timeoutMs ?? 10_000,
  });
  return {
    transport,
    correlation: createClient(CorrelationService, transport),
    runbook: createClient(RunbookService, transport),
    capacity: createClient(CapacityService, transport),
  };
}
