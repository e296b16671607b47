"""`SyncAetherOpsClient`: the blocking client, for scripts, notebooks and the CLI.

The same methods as `AetherOpsClient`, on a synchronous grpc channel (so it is
tested with grpcio-testing's in-process channel). Streams are plain iterators;
closing the iterator (or leaving the loop) cancels the RPC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc

from clients.sdk import _requests as build
from clients.sdk._config import UNSET, ClientConfig, RetryPolicy, echoed_tracking_id, new_tracking_id, resolve_config
from clients.sdk._errors import from_rpc_error, method_name
from clients.sdk._pages import follow
from gen.aetherops.capacity.v1 import capacity_pb2, capacity_pb2_grpc
from gen.aetherops.correlation.v1 import correlation_pb2, correlation_pb2_grpc
from gen.aetherops.runbook.v1 import runbook_pb2, runbook_pb2_grpc

__all__ = ["SyncAetherOpsClient"]

R = TypeVar("R")


class SyncAetherOpsClient:
    """Blocking client. Use as `with SyncAetherOpsClient("host:port", token=...) as client:`.

    `channel` lets a test (or an application with its own channel set-up) supply
    the grpc.Channel; the client then does not close it.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float | None = UNSET,
        retry: RetryPolicy | None = UNSET,
        config: ClientConfig | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        config = resolve_config(
            config,
            address=address,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            timeout=timeout,
            retry=retry,
        )
        self.config = config
        if channel is None:
            if config.secure:
                channel = grpc.secure_channel(
                    config.address, config.channel_credentials(), options=config.channel_options()
                )
            else:
                channel = grpc.insecure_channel(config.address, options=config.channel_options())
            self._owns_channel = True
        else:
            self._owns_channel = False
        self.channel = channel
        # The raw stubs, for anything the typed methods do not cover.
        self.correlation = correlation_pb2_grpc.CorrelationServiceStub(channel)
        self.runbook = runbook_pb2_grpc.RunbookServiceStub(channel)
        self.capacity = capacity_pb2_grpc.CapacityServiceStub(channel)
        self.last_tracking_id = ""

    def __enter__(self) -> SyncAetherOpsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float | None:
        return self.config.timeout_s if timeout is None else timeout

    def _unary(
        self,
        method: Callable[..., Any],
        request: Any,
        response_type: type[R],
        timeout: float | None,
        tracking_id: str | None,
        *,
        bulk: bool = False,
    ) -> R:
        # A bulk upload lasts as long as its input: no default deadline (10 s cut a load of 300,000
        # alerts short), only the caller's.
        deadline = timeout if bulk else self._timeout(timeout)
        sent = tracking_id or new_tracking_id()
        try:
            response, call = method.with_call(  # type: ignore[attr-defined]
                request, timeout=deadline, metadata=self.config.metadata(sent)
            )
        except grpc.RpcError as exc:
            self.last_tracking_id = sent
            raise from_rpc_error(exc, tracking_id=sent, method=method_name(method)) from None
        self.last_tracking_id = echoed_tracking_id(call.trailing_metadata()) or sent
        return cast(R, response)  # the stub's declared response type (grpc itself is untyped here)

    def _stream(
        self, method: Callable[..., Any], request: Any, timeout: float | None, tracking_id: str | None
    ) -> Iterator[Any]:
        # Watch streams are long-lived: no default deadline unless the caller gives one.
        sent = tracking_id or new_tracking_id()
        call = method(request, timeout=timeout, metadata=self.config.metadata(sent))
        try:
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, tracking_id=sent, method=method_name(method)) from None
        finally:
            call.cancel()

    # -- CorrelationService -------------------------------------------------------------------

    def ingest_alert(
        self,
        alert: correlation_pb2.Alert | None = None,
        *,
        alert_id: str = "",
        satellite_id: str = "",
        subsystem: str = "",
        severity: int = 0,
        timestamp: build.TimeLike | None = None,
        message: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.IngestAlertResponse:
        """Ingests one alert (idempotent on alert_id): pass an Alert or its fields (timestamp defaults to now)."""
        if alert is None:
            alert = build.alert(
                alert_id=alert_id,
                satellite_id=satellite_id,
                subsystem=subsystem,
                severity=severity,
                timestamp_=timestamp,
                message=message,
                labels=labels,
            )
        request = correlation_pb2.IngestAlertRequest(alert=alert, request_id=request_id or "")
        return self._unary(
            self.correlation.IngestAlert, request, correlation_pb2.IngestAlertResponse, timeout, tracking_id
        )

    def ingest_alerts(
        self,
        alerts: Iterable[correlation_pb2.Alert],
        *,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.IngestAlertsResponse:
        """Bulk ingest over the client stream; rejections come back with their index in `alerts`.
        No deadline unless `timeout` is given: the upload takes as long as its input."""
        requests = (correlation_pb2.IngestAlertsRequest(alert=a) for a in alerts)
        return self._unary(
            self.correlation.IngestAlerts,
            requests,
            correlation_pb2.IngestAlertsResponse,
            timeout,
            tracking_id,
            bulk=True,
        )

    def get_cluster(
        self, cluster_id: str, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> correlation_pb2.GetClusterResponse:
        request = correlation_pb2.GetClusterRequest(cluster_id=cluster_id)
        return self._unary(
            self.correlation.GetCluster, request, correlation_pb2.GetClusterResponse, timeout, tracking_id
        )

    def list_active_clusters(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        satellite_id: str = "",
        min_severity: int = 0,
        acknowledged: bool | None = None,
        with_alerts: bool = True,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.ListActiveClustersResponse:
        """Open clusters active within the correlation window, newest activity first; `acknowledged`
        True or False takes only the acknowledged ones or only those nobody acknowledged;
        `with_alerts` False leaves the alerts out (CLUSTER_VIEW_BASIC: cheap to poll in a storm)."""
        request = correlation_pb2.ListActiveClustersRequest(
            page_size=page_size,
            page_token=page_token,
            satellite_id=satellite_id,
            min_severity=min_severity,
            acknowledgement=build.acknowledgement(acknowledged),
            view=build.cluster_view(with_alerts),
        )
        return self._unary(
            self.correlation.ListActiveClusters,
            request,
            correlation_pb2.ListActiveClustersResponse,
            timeout,
            tracking_id,
        )

    def iter_active_clusters(
        self,
        *,
        satellite_id: str = "",
        min_severity: int = 0,
        acknowledged: bool | None = None,
        with_alerts: bool = True,
        page_size: int = 0,
    ) -> Iterator[correlation_pb2.Cluster]:
        """Every active cluster, following next_page_token."""
        return follow(
            lambda token: self.list_active_clusters(
                page_size=page_size,
                page_token=token,
                satellite_id=satellite_id,
                min_severity=min_severity,
                acknowledged=acknowledged,
                with_alerts=with_alerts,
            ),
            lambda page: page.clusters,
        )

    def list_clusters(
        self,
        *,
        status: int | str = correlation_pb2.CLUSTER_STATUS_UNSPECIFIED,
        satellite_id: str = "",
        min_severity: int = 0,
        start: build.TimeLike | None = None,
        end: build.TimeLike | None = None,
        acknowledged: bool | None = None,
        with_alerts: bool = True,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.ListClustersResponse:
        """Stored clusters, open or closed (the incident history), most recently opened first.

        `status` takes the enum's number or name ("open", "CLUSTER_STATUS_CLOSED"; unspecified: both);
        `start` and `end` keep the clusters with alerts in [start, end); `acknowledged` and
        `with_alerts` as for `list_active_clusters`."""
        request = build.list_clusters(
            status=status,
            satellite_id=satellite_id,
            min_severity=min_severity,
            start=start,
            end=end,
            acknowledged=acknowledged,
            with_alerts=with_alerts,
            page_size=page_size,
            page_token=page_token,
        )
        return self._unary(
            self.correlation.ListClusters, request, correlation_pb2.ListClustersResponse, timeout, tracking_id
        )

    def iter_clusters(
        self,
        *,
        status: int | str = correlation_pb2.CLUSTER_STATUS_UNSPECIFIED,
        satellite_id: str = "",
        min_severity: int = 0,
        start: build.TimeLike | None = None,
        end: build.TimeLike | None = None,
        acknowledged: bool | None = None,
        with_alerts: bool = True,
        page_size: int = 0,
    ) -> Iterator[correlation_pb2.Cluster]:
        """Every matching stored cluster, following next_page_token."""
        return follow(
            lambda token: self.list_clusters(
                status=status,
                satellite_id=satellite_id,
                min_severity=min_severity,
                start=start,
                end=end,
                acknowledged=acknowledged,
                with_alerts=with_alerts,
                page_size=page_size,
                page_token=token,
            ),
            lambda page: page.clusters,
        )

    def list_alerts(
        self,
        *,
        by_tracking_id: str = "",
        cluster_id: str = "",
        satellite_id: str = "",
        silence_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.ListAlertsResponse:
        """Stored alerts (duplicates included) by the tracking id they were ingested under, cluster or
        the silence that covered them.

        `by_tracking_id` filters; `tracking_id`, as everywhere, is the one this call itself is sent under."""
        request = correlation_pb2.ListAlertsRequest(
            page_size=page_size,
            page_token=page_token,
            tracking_id=by_tracking_id,
            cluster_id=cluster_id,
            satellite_id=satellite_id,
            silence_id=silence_id,
        )
        return self._unary(
            self.correlation.ListAlerts, request, correlation_pb2.ListAlertsResponse, timeout, tracking_id
        )

    def iter_alerts(
        self,
        *,
        by_tracking_id: str = "",
        cluster_id: str = "",
        satellite_id: str = "",
        silence_id: str = "",
        page_size: int = 0,
    ) -> Iterator[correlation_pb2.StoredAlert]:
        """Every matching stored alert, following next_page_token."""
        return follow(
            lambda token: self.list_alerts(
                by_tracking_id=by_tracking_id,
                cluster_id=cluster_id,
                satellite_id=satellite_id,
                silence_id=silence_id,
                page_size=page_size,
                page_token=token,
            ),
            lambda page: page.alerts,
        )

    def close_cluster(
        self,
        cluster_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.CloseClusterResponse:
        request = correlation_pb2.CloseClusterRequest(
            cluster_id=cluster_id, reason=reason, request_id=build.request_id(request_id)
        )
        return self._unary(
            self.correlation.CloseCluster, request, correlation_pb2.CloseClusterResponse, timeout, tracking_id
        )

    def acknowledge_cluster(
        self,
        cluster_id: str,
        *,
        note: str = "",
        take_over: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.AcknowledgeClusterResponse:
        """Acknowledges a cluster: you work on it. `take_over`: hand over one someone else holds."""
        request = correlation_pb2.AcknowledgeClusterRequest(
            cluster_id=cluster_id, note=note, request_id=build.request_id(request_id), take_over=take_over
        )
        return self._unary(
            self.correlation.AcknowledgeCluster,
            request,
            correlation_pb2.AcknowledgeClusterResponse,
            timeout,
            tracking_id,
        )

    def merge_clusters(
        self,
        cluster_id: str,
        source_cluster_ids: Iterable[str],
        *,
        note: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.MergeClustersResponse:
        """Merges the source clusters into `cluster_id` (see CorrelationService.MergeClusters)."""
        request = correlation_pb2.MergeClustersRequest(
            cluster_id=cluster_id,
            source_cluster_ids=list(source_cluster_ids),
            note=note,
            request_id=build.request_id(request_id),
        )
        return self._unary(
            self.correlation.MergeClusters,
            request,
            correlation_pb2.MergeClustersResponse,
            timeout,
            tracking_id,
        )

    def create_silence(
        self,
        *,
        end: build.TimeLike,
        comment: str,
        satellite_ids: Iterable[str] = (),
        subsystems: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        start: build.TimeLike | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.CreateSilenceResponse:
        """Keeps the alerts that match (every matcher given; at least one) and were observed in
        [start, end) out of incidents. `start` None: from now."""
        request = correlation_pb2.CreateSilenceRequest(
            silence=build.silence(
                end=end,
                comment=comment,
                satellite_ids=satellite_ids,
                subsystems=subsystems,
                labels=labels,
                start=start,
            ),
            request_id=build.request_id(request_id),
        )
        return self._unary(
            self.correlation.CreateSilence, request, correlation_pb2.CreateSilenceResponse, timeout, tracking_id
        )

    def list_silences(
        self,
        *,
        include_ended: bool = False,
        satellite_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.ListSilencesResponse:
        """Silences, most recently created first; those not yet ended unless `include_ended`."""
        request = correlation_pb2.ListSilencesRequest(
            page_size=page_size, page_token=page_token, include_ended=include_ended, satellite_id=satellite_id
        )
        return self._unary(
            self.correlation.ListSilences, request, correlation_pb2.ListSilencesResponse, timeout, tracking_id
        )

    def iter_silences(
        self, *, include_ended: bool = False, satellite_id: str = "", page_size: int = 0
    ) -> Iterator[correlation_pb2.Silence]:
        """Every matching silence, following next_page_token."""
        return follow(
            lambda token: self.list_silences(
                include_ended=include_ended, satellite_id=satellite_id, page_size=page_size, page_token=token
            ),
            lambda page: page.silences,
        )

    def expire_silence(
        self,
        silence_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.ExpireSilenceResponse:
        """Ends a silence now: alerts observed from now on correlate again."""
        request = correlation_pb2.ExpireSilenceRequest(silence_id=silence_id, request_id=build.request_id(request_id))
        return self._unary(
            self.correlation.ExpireSilence, request, correlation_pb2.ExpireSilenceResponse, timeout, tracking_id
        )

    def identify_root_cause(
        self, cluster_id: str, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> correlation_pb2.IdentifyRootCauseResponse:
        request = correlation_pb2.IdentifyRootCauseRequest(cluster_id=cluster_id)
        return self._unary(
            self.correlation.IdentifyRootCause, request, correlation_pb2.IdentifyRootCauseResponse, timeout, tracking_id
        )

    def score_alerts(
        self,
        first: correlation_pb2.Alert,
        second: correlation_pb2.Alert,
        *,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> correlation_pb2.ScoreAlertsResponse:
        request = correlation_pb2.ScoreAlertsRequest(first=first, second=second)
        return self._unary(
            self.correlation.ScoreAlerts, request, correlation_pb2.ScoreAlertsResponse, timeout, tracking_id
        )

    def watch_clusters(
        self,
        *,
        satellite_ids: Iterable[str] = (),
        min_severity: int = 0,
        event_types: Iterable[correlation_pb2.ClusterEventType.ValueType] = (),
        since: build.TimeLike | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> Iterator[correlation_pb2.WatchClustersResponse]:
        """Cluster events as they are committed; with `since`, first those published since then."""
        request = correlation_pb2.WatchClustersRequest(
            satellite_ids=list(satellite_ids), min_severity=min_severity, event_types=list(event_types)
        )
        if since is not None:
            request.start_time.CopyFrom(build.timestamp(since))
        return self._stream(self.correlation.WatchClusters, request, timeout, tracking_id)

    # -- RunbookService -----------------------------------------------------------------------

    def list_actions(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None, tracking_id: str | None = None
    ) -> runbook_pb2.ListActionsResponse:
        request = runbook_pb2.ListActionsRequest(page_size=page_size, page_token=page_token)
        return self._unary(self.runbook.ListActions, request, runbook_pb2.ListActionsResponse, timeout, tracking_id)

    def register_runbook(
        self,
        runbook: runbook_pb2.Runbook | Mapping[str, Any],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.RegisterRunbookResponse:
        """Registers a Runbook message or its JSON form (a dict, e.g. from YAML)."""
        request = runbook_pb2.RegisterRunbookRequest(
            runbook=build.runbook(runbook), request_id=build.request_id(request_id)
        )
        return self._unary(
            self.runbook.RegisterRunbook, request, runbook_pb2.RegisterRunbookResponse, timeout, tracking_id
        )

    def get_runbook(
        self, runbook_id: str, *, version: int = 0, timeout: float | None = None, tracking_id: str | None = None
    ) -> runbook_pb2.GetRunbookResponse:
        request = runbook_pb2.GetRunbookRequest(runbook_id=runbook_id, version=version)
        return self._unary(self.runbook.GetRunbook, request, runbook_pb2.GetRunbookResponse, timeout, tracking_id)

    def list_runbooks(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None, tracking_id: str | None = None
    ) -> runbook_pb2.ListRunbooksResponse:
        request = runbook_pb2.ListRunbooksRequest(page_size=page_size, page_token=page_token)
        return self._unary(self.runbook.ListRunbooks, request, runbook_pb2.ListRunbooksResponse, timeout, tracking_id)

    def find_matching_runbooks(
        self,
        incident_data: Mapping[str, Any],
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.FindMatchingRunbooksResponse:
        request = runbook_pb2.FindMatchingRunbooksRequest(
            incident_data=build.struct(incident_data), page_size=page_size, page_token=page_token
        )
        return self._unary(
            self.runbook.FindMatchingRunbooks, request, runbook_pb2.FindMatchingRunbooksResponse, timeout, tracking_id
        )

    def iter_matching_runbooks(
        self, incident_data: Mapping[str, Any], *, page_size: int = 0
    ) -> Iterator[runbook_pb2.Runbook]:
        """Every runbook `incident_data` matches, following next_page_token."""
        return follow(
            lambda token: self.find_matching_runbooks(incident_data, page_size=page_size, page_token=token),
            lambda page: page.runbooks,
        )

    def start_execution(
        self,
        runbook_id: str,
        *,
        variables: Mapping[str, Any] | None = None,
        triggered_by: str = "",
        dry_run: bool = False,
        incident_id: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.StartExecutionResponse:
        """Starts an execution; `incident_id` (a cluster id) lists it under that incident and makes the
        incident's fields variables, as for an incident start (a name in `variables` wins)."""
        request = runbook_pb2.StartExecutionRequest(
            runbook_id=runbook_id,
            variables=build.struct(variables),
            triggered_by=triggered_by,
            dry_run=dry_run,
            request_id=build.request_id(request_id),
            incident_id=incident_id,
        )
        return self._unary(
            self.runbook.StartExecution, request, runbook_pb2.StartExecutionResponse, timeout, tracking_id
        )

    def execute_next_step(
        self,
        execution_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.ExecuteNextStepResponse:
        request = runbook_pb2.ExecuteNextStepRequest(execution_id=execution_id, request_id=build.request_id(request_id))
        return self._unary(
            self.runbook.ExecuteNextStep, request, runbook_pb2.ExecuteNextStepResponse, timeout, tracking_id
        )

    def approve_step(
        self,
        execution_id: str,
        step_id: str,
        *,
        approver: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.ApproveStepResponse:
        request = runbook_pb2.ApproveStepRequest(
            execution_id=execution_id, step_id=step_id, approver=approver, request_id=build.request_id(request_id)
        )
        return self._unary(self.runbook.ApproveStep, request, runbook_pb2.ApproveStepResponse, timeout, tracking_id)

    def reject_step(
        self,
        execution_id: str,
        step_id: str,
        *,
        reason: str = "",
        approver: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.RejectStepResponse:
        request = runbook_pb2.RejectStepRequest(
            execution_id=execution_id,
            step_id=step_id,
            approver=approver,
            reason=reason,
            request_id=build.request_id(request_id),
        )
        return self._unary(self.runbook.RejectStep, request, runbook_pb2.RejectStepResponse, timeout, tracking_id)

    def cancel_execution(
        self,
        execution_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.CancelExecutionResponse:
        request = runbook_pb2.CancelExecutionRequest(
            execution_id=execution_id, reason=reason, request_id=build.request_id(request_id)
        )
        return self._unary(
            self.runbook.CancelExecution, request, runbook_pb2.CancelExecutionResponse, timeout, tracking_id
        )

    def rollback_execution(
        self,
        execution_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.RollbackExecutionResponse:
        request = runbook_pb2.RollbackExecutionRequest(
            execution_id=execution_id, request_id=build.request_id(request_id)
        )
        return self._unary(
            self.runbook.RollbackExecution, request, runbook_pb2.RollbackExecutionResponse, timeout, tracking_id
        )

    def get_execution_status(
        self,
        execution_id: str,
        *,
        as_of: datetime | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.GetExecutionStatusResponse:
        request = runbook_pb2.GetExecutionStatusRequest(execution_id=execution_id)
        if as_of is not None:
            request.as_of_time.CopyFrom(build.timestamp(as_of))
        return self._unary(
            self.runbook.GetExecutionStatus, request, runbook_pb2.GetExecutionStatusResponse, timeout, tracking_id
        )

    def get_step_output(
        self, execution_id: str, step_id: str, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> runbook_pb2.GetStepOutputResponse:
        """One step's output, whole (an Execution leaves out outputs past about 2 MiB: output_omitted)."""
        request = runbook_pb2.GetStepOutputRequest(execution_id=execution_id, step_id=step_id)
        return self._unary(self.runbook.GetStepOutput, request, runbook_pb2.GetStepOutputResponse, timeout, tracking_id)

    def list_executions(
        self,
        *,
        by_tracking_id: str = "",
        incident_id: str = "",
        runbook_id: str = "",
        status: int | str = runbook_pb2.RUNBOOK_STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> runbook_pb2.ListExecutionsResponse:
        """Executions, newest start first (index fields only: GetExecutionStatus has steps and audit).

        `by_tracking_id` filters (executions started under it or changed by a request under it);
        `status` takes the enum's number or name ("running", "RUNBOOK_STATUS_RUNNING"); `tracking_id`,
        as everywhere, is the one this call itself is sent under."""
        request = runbook_pb2.ListExecutionsRequest(
            page_size=page_size,
            page_token=page_token,
            tracking_id=by_tracking_id,
            incident_id=incident_id,
            runbook_id=runbook_id,
            status=build.runbook_status(status),
        )
        return self._unary(
            self.runbook.ListExecutions, request, runbook_pb2.ListExecutionsResponse, timeout, tracking_id
        )

    def iter_executions(
        self,
        *,
        by_tracking_id: str = "",
        incident_id: str = "",
        runbook_id: str = "",
        status: int | str = runbook_pb2.RUNBOOK_STATUS_UNSPECIFIED,
        page_size: int = 0,
    ) -> Iterator[runbook_pb2.Execution]:
        """Every matching execution, following next_page_token."""
        return follow(
            lambda token: self.list_executions(
                by_tracking_id=by_tracking_id,
                incident_id=incident_id,
                runbook_id=runbook_id,
                status=status,
                page_size=page_size,
                page_token=token,
            ),
            lambda page: page.executions,
        )

    def watch_execution(
        self, execution_id: str, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> Iterator[runbook_pb2.WatchExecutionResponse]:
        request = runbook_pb2.WatchExecutionRequest(execution_id=execution_id)
        return self._stream(self.runbook.WatchExecution, request, timeout, tracking_id)

    # -- CapacityService ----------------------------------------------------------------------

    def ingest_snapshot(
        self,
        snapshot: capacity_pb2.ResourceSnapshot | None = None,
        *,
        satellite_id: str = "",
        resource: int | str = 0,
        value: float = 0.0,
        unit: str = "",
        timestamp: build.TimeLike | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> capacity_pb2.IngestSnapshotResponse:
        """Stores one snapshot (idempotent on satellite, resource and timestamp)."""
        if snapshot is None:
            snapshot = build.snapshot(
                satellite_id=satellite_id, resource=resource, value=value, unit=unit, timestamp_=timestamp
            )
        request = capacity_pb2.IngestSnapshotRequest(snapshot=snapshot, request_id=build.request_id(request_id))
        return self._unary(
            self.capacity.IngestSnapshot, request, capacity_pb2.IngestSnapshotResponse, timeout, tracking_id
        )

    def ingest_snapshots(
        self,
        snapshots: Iterable[capacity_pb2.ResourceSnapshot],
        *,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> capacity_pb2.IngestSnapshotsResponse:
        """Bulk ingest over the client stream (no deadline unless `timeout` is given, as for alerts)."""
        requests = (capacity_pb2.IngestSnapshotsRequest(snapshot=s) for s in snapshots)
        return self._unary(
            self.capacity.IngestSnapshots,
            requests,
            capacity_pb2.IngestSnapshotsResponse,
            timeout,
            tracking_id,
            bulk=True,
        )

    def add_scheduled_mission(
        self,
        mission: capacity_pb2.ScheduledMission,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> capacity_pb2.AddScheduledMissionResponse:
        request = capacity_pb2.AddScheduledMissionRequest(mission=mission, request_id=build.request_id(request_id))
        return self._unary(
            self.capacity.AddScheduledMission, request, capacity_pb2.AddScheduledMissionResponse, timeout, tracking_id
        )

    def delete_scheduled_mission(
        self,
        mission_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> capacity_pb2.DeleteScheduledMissionResponse:
        request = capacity_pb2.DeleteScheduledMissionRequest(
            mission_id=mission_id, request_id=build.request_id(request_id)
        )
        return self._unary(
            self.capacity.DeleteScheduledMission,
            request,
            capacity_pb2.DeleteScheduledMissionResponse,
            timeout,
            tracking_id,
        )

    def compute_consumption_rate(
        self, satellite_id: str, resource: int | str, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> capacity_pb2.ComputeConsumptionRateResponse:
        request = capacity_pb2.ComputeConsumptionRateRequest(
            satellite_id=satellite_id, resource_type=build.resource_type(resource)
        )
        return self._unary(
            self.capacity.ComputeConsumptionRate,
            request,
            capacity_pb2.ComputeConsumptionRateResponse,
            timeout,
            tracking_id,
        )

    def forecast_exhaustion(
        self, satellite_id: str, resource: int | str, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> capacity_pb2.ForecastExhaustionResponse:
        request = capacity_pb2.ForecastExhaustionRequest(
            satellite_id=satellite_id, resource_type=build.resource_type(resource)
        )
        return self._unary(
            self.capacity.ForecastExhaustion, request, capacity_pb2.ForecastExhaustionResponse, timeout, tracking_id
        )

    def get_fleet_risk_summary(
        self, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> capacity_pb2.GetFleetRiskSummaryResponse:
        request = capacity_pb2.GetFleetRiskSummaryRequest()
        return self._unary(
            self.capacity.GetFleetRiskSummary, request, capacity_pb2.GetFleetRiskSummaryResponse, timeout, tracking_id
        )

    def get_critical_forecasts(
        self,
        *,
        horizon: timedelta | float | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> capacity_pb2.GetCriticalForecastsResponse:
        request = capacity_pb2.GetCriticalForecastsRequest(page_size=page_size, page_token=page_token)
        if horizon is not None:
            request.horizon.CopyFrom(build.duration(horizon))
        return self._unary(
            self.capacity.GetCriticalForecasts, request, capacity_pb2.GetCriticalForecastsResponse, timeout, tracking_id
        )

    def recommend_interventions(
        self, satellite_id: str, *, timeout: float | None = None, tracking_id: str | None = None
    ) -> capacity_pb2.RecommendInterventionsResponse:
        request = capacity_pb2.RecommendInterventionsRequest(satellite_id=satellite_id)
        return self._unary(
            self.capacity.RecommendInterventions,
            request,
            capacity_pb2.RecommendInterventionsResponse,
            timeout,
            tracking_id,
        )

    def list_snapshots(
        self,
        satellite_id: str,
        resource: int | str,
        *,
        start: build.TimeLike | None = None,
        end: build.TimeLike | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> capacity_pb2.ListSnapshotsResponse:
        """Stored snapshots of one series, oldest first, within [start, end) when given."""
        request = capacity_pb2.ListSnapshotsRequest(
            satellite_id=satellite_id,
            resource_type=build.resource_type(resource),
            page_size=page_size,
            page_token=page_token,
        )
        if start is not None:
            request.start_time.CopyFrom(build.timestamp(start))
        if end is not None:
            request.end_time.CopyFrom(build.timestamp(end))
        return self._unary(
            self.capacity.ListSnapshots, request, capacity_pb2.ListSnapshotsResponse, timeout, tracking_id
        )

    def list_scheduled_missions(
        self,
        satellite_id: str,
        resource: int | str | None = None,
        *,
        start: build.TimeLike | None = None,
        end: build.TimeLike | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        tracking_id: str | None = None,
    ) -> capacity_pb2.ListScheduledMissionsResponse:
        """A satellite's scheduled missions, earliest start first: those impacting `resource` and
        overlapping [start, end) when given."""
        request = capacity_pb2.ListScheduledMissionsRequest(
            satellite_id=satellite_id,
            resource_type=(
                build.resource_type(resource) if resource is not None else capacity_pb2.RESOURCE_TYPE_UNSPECIFIED
            ),
            page_size=page_size,
            page_token=page_token,
        )
        if start is not None:
            request.start_time.CopyFrom(build.timestamp(start))
        if end is not None:
            request.end_time.CopyFrom(build.timestamp(end))
        return self._unary(
            self.capacity.ListScheduledMissions,
            request,
            capacity_pb2.ListScheduledMissionsResponse,
            timeout,
            tracking_id,
        )

    def iter_snapshots(
        self,
        satellite_id: str,
        resource: int | str,
        *,
        start: build.TimeLike | None = None,
        end: build.TimeLike | None = None,
        page_size: int = 0,
    ) -> Iterator[capacity_pb2.ResourceSnapshot]:
        """Every stored snapshot of the series in the range, following next_page_token."""
        return follow(
            lambda token: self.list_snapshots(
                satellite_id, resource, start=start, end=end, page_size=page_size, page_token=token
            ),
            lambda page: page.snapshots,
        )

    def iter_scheduled_missions(
        self,
        satellite_id: str,
        resource: int | str | None = None,
        *,
        start: build.TimeLike | None = None,
        end: build.TimeLike | None = None,
        page_size: int = 0,
    ) -> Iterator[capacity_pb2.ScheduledMission]:
        """Every scheduled mission of the satellite (impacting `resource`, overlapping [start, end) when
        given), earliest start first, following next_page_token."""
        return follow(
            lambda token: self.list_scheduled_missions(
                satellite_id, resource, start=start, end=end, page_size=page_size, page_token=token
            ),
            lambda page: page.missions,
        )


def _name(method: Any) -> str:
    """The RPC path of a multi-callable, for error messages (best effort)."""
    for attribute in ("_method", "method"):
        value = getattr(method, attribute, None)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, str):
            return value
    return ""
