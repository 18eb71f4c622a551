"""OpenTelemetry traces of proxied requests: optional, off unless the OTEL_* variables ask.

With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) set, each proxied request is a
SERVER span with the GenAI semantic-convention attributes and Tollgate's own (key name, cost,
provider, failovers), with one CLIENT child span per upstream attempt, continuing the trace of
an incoming `traceparent`. The spans are made retrospectively, once, from the request's
`RequestFacts` when it has been answered: the request's path pays nothing for them but the
two headers it reads. They go to an OTLP/HTTP collector in batches, from the SDK's thread.

The opentelemetry packages are an add-on (requirements-otel.txt): they are imported only when
tracing is asked for, so the default install neither needs nor loads them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from core.pricing import format_usd
from core.telemetry.facts import OK, RequestFacts

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.util.types import AttributeValue

log = logging.getLogger("tollgate.telemetry")

# The standard variables that turn tracing on or off (the exporter reads the rest itself:
# headers, timeout, compression, certificates; the SDK reads OTEL_BSP_*, OTEL_TRACES_SAMPLER).
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_SUPPORTED_PROTOCOL = "http/protobuf"
DEFAULT_SERVICE_NAME = "tollgate"

# GenAI semantic conventions (gen_ai.*). `gen_ai.system` is what the issue and older backends
# read; newer ones read `gen_ai.provider.name`, which replaced it with the same values.
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_CACHE_CREATION_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
HTTP_STATUS_CODE = "http.response.status_code"
ERROR_TYPE = "error.type"
# Tollgate's own.
REQUEST_ID = "tollgate.request_id"
ENDPOINT = "tollgate.endpoint"
KEY_NAME = "tollgate.key.name"  # the key's name, never its secret
PROVIDER = "tollgate.provider"
COST_NANOS = "tollgate.cost_nanos"  # exact integer nano-dollars
COST_USD = "tollgate.cost_usd"  # a plain decimal string, as the x-tollgate-cost header: exact
COST_TYPE = "tollgate.cost_type"
FAILOVERS = "tollgate.failovers"
STREAM = "tollgate.stream"
TIME_TO_FIRST_BYTE = "tollgate.time_to_first_byte_s"
OUTCOME = "tollgate.outcome"

# gen_ai.operation.name per proxied endpoint; an endpoint the conventions name no operation
# for (images, audio, moderations) is named by itself.
_OPERATIONS = {
    "chat/completions": "chat",
    "messages": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
# gen_ai.provider.name / gen_ai.system per engine; others (echo) as they are.
_SYSTEMS = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}


class Tracing:
    """The app's tracer provider (not the process-global one: several apps may share a
    process, as tests build them) and the span maker."""

    def __init__(self, provider: TracerProvider):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("tollgate")
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = trace.set_span_in_context
        self._server, self._client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self._status, self._error = trace.Status, trace.StatusCode.ERROR

    @classmethod
    def from_environment(cls) -> Tracing | None:
        """Tracing as the standard OTEL_* variables ask, or None: no OTLP endpoint set, the
        SDK or the traces exporter switched off, or the packages not installed (one warning)."""
        environ = os.environ
        if not any(environ.get(name) for name in _ENDPOINT_VARIABLES):
            return None
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            return None
        try:
            provider = _tracer_provider()
        except ImportError as exc:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): no traces are sent."
                " Install it with `pip install -r requirements-otel.txt`",
                exc,
            )
            return None
        return cls(provider)

    def record(self, facts: RequestFacts) -> None:
        """The request's SERVER span and its attempts' CLIENT spans, from what it did."""
        operation = _OPERATIONS.get(facts.endpoint, facts.endpoint)
        system = _SYSTEMS.get(facts.attempts[-1].engine, facts.attempts[-1].engine) if facts.attempts else ""
        parent = self._propagator.extract(facts.trace_headers or {})
        server = self._tracer.start_span(
            f"{operation} {facts.model}" if facts.model else operation,
            context=parent,
            kind=self._server,
            attributes=_server_attributes(facts, operation, system),
            start_time=facts.wall_ns,
        )
        # A client's error (4xx) is not the server's (HTTP semantic conventions); a broken
        # stream is, though its status was 200 when its headers went out.
        if facts.status >= 500 or (facts.error_code and facts.status < 400):
            server.set_status(self._status(self._error, facts.error_code or str(facts.status)))
        within = self._in_context(server)
        for attempt in facts.attempts:
            called = _SYSTEMS.get(attempt.engine, attempt.engine)
            attributes: dict[str, AttributeValue] = {
                GEN_AI_SYSTEM: called,
                GEN_AI_PROVIDER_NAME: called,
                GEN_AI_OPERATION_NAME: operation,
                GEN_AI_REQUEST_MODEL: attempt.upstream_model,
                PROVIDER: attempt.provider,
                OUTCOME: attempt.outcome,
            }
            span = self._tracer.start_span(
                f"{operation} {attempt.upstream_model}",
                context=within,
                kind=self._client,
                attributes=attributes,
                start_time=facts.wall_time_ns(attempt.started),
            )
            if attempt.outcome != OK:
                span.set_status(self._status(self._error, attempt.outcome))
            span.end(end_time=facts.wall_time_ns(attempt.ended))
        server.end(end_time=facts.wall_time_ns(facts.ended))

    def shutdown(self) -> None:
        """Send the spans still queued, then stop the exporter's thread (app shutdown)."""
        self.provider.shutdown()  # its span processors flush before they stop


def _tracer_provider() -> TracerProvider:
    """An SDK tracer provider sending batches to OTLP over HTTP; raises ImportError without
    the packages. service.name is `tollgate` unless the operator named one
    (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES): Resource.create would let ours win."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = next((os.environ[name] for name in _PROTOCOL_VARIABLES if os.environ.get(name)), _SUPPORTED_PROTOCOL)
    if protocol.strip().lower() != _SUPPORTED_PROTOCOL:
        log.warning("OTLP protocol '%s' is not supported: traces are sent as %s", protocol, _SUPPORTED_PROTOCOL)
    named = SERVICE_NAME in OTELResourceDetector().detect().attributes
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _server_attributes(facts: RequestFacts, operation: str, system: str) -> dict[str, Any]:
    """The request span's attributes: what was asked, who answered, what it used and cost."""
    attributes: dict[str, Any] = {
        GEN_AI_OPERATION_NAME: operation,
        HTTP_STATUS_CODE: facts.status,
        REQUEST_ID: facts.request_id,
        ENDPOINT: facts.endpoint,
        FAILOVERS: facts.failovers,
        STREAM: facts.stream,
    }
    # Set only when known (an empty string or zero would read as a value in a backend).
    known: dict[str, Any] = {
        GEN_AI_SYSTEM: system,
        GEN_AI_PROVIDER_NAME: system,
        GEN_AI_REQUEST_MODEL: facts.model,
        KEY_NAME: facts.key_name,
        PROVIDER: facts.provider,
        ERROR_TYPE: facts.error_code,
    }
    if facts.first_byte is not None:
        attributes[TIME_TO_FIRST_BYTE] = facts.seconds(facts.first_byte)
    record = facts.settled
    if record is not None:
        attributes[GEN_AI_RESPONSE_MODEL] = record.upstream_model
        attributes[GEN_AI_INPUT_TOKENS] = record.prompt_tokens
        attributes[GEN_AI_OUTPUT_TOKENS] = record.completion_tokens
        attributes[COST_NANOS] = record.cost_nanos
        attributes[COST_USD] = format_usd(record.cost_nanos)
        attributes[COST_TYPE] = record.cost_type
        known[GEN_AI_CACHE_READ_TOKENS] = record.cached_tokens
        known[GEN_AI_CACHE_CREATION_TOKENS] = record.cache_write_tokens
        known[GEN_AI_REASONING_TOKENS] = record.reasoning_tokens
    attributes.update((name, value) for name, value in known.items() if value)
    return attributes
