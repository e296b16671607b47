import type { Client, Transport } from "@connectrpc/connect";
import type { CapacityService } from "./gen/aetherops/capacity/v1/capacity_pb.js";
import type { CorrelationService } from "./gen/aetherops/correlation/v1/correlation_pb.js";
import type { RunbookService } from "./gen/aetherops/runbook/v1/runbook_pb.js";

export * as capacity from "./gen/aetherops/capacity/v1/capacity_pb.js";
export * as common from "./gen/aetherops/common/v1/common_pb.js";
export * as correlation from "./gen/aetherops/correlation/v1/correlation_pb.js";
export * as runbook from "./gen/aetherops/runbook/v1/runbook_pb.js";

export interface AetherOpsClientOptions {
  /** Sent as `authorization: Bearer <token>`. */
  token?: string;
  /** Default deadline per call (10 s when unset). */
  timeoutMs?: number;
}

export interface AetherOpsClients {
  transport: Transport;
  correlation: Client<typeof CorrelationService>;
  runbook: Client<typeof RunbookService>;
  capacity: Client<typeof CapacityService>;
}

export function createAetherOpsClients(baseUrl: string, options?: AetherOpsClientOptions): AetherOpsClients;
