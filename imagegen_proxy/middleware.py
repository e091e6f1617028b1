"""`ImageGenProxy`: the pure-ASGI middleware that serves the image-generation paths."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx

from .admin.plane import AdminPlane
from .assembly import (
    authenticator_for,
    idempotency_for,
    image_store_for,
    ledger_for,
    metrics_for,
    pool_for,
    rate_limiter_for,
    store_for,
    tracing_for,
)
from .config import ProxyConfig
from .generation import Generation, client_request_id
from .governance.auth import (
    Authenticator,
    Principal,
    check_policy,
    read_credentials,
)
from .governance.pricing import Prices, usd
from .governance.ratelimit import RateLimiter, UsageObserver
from .observe.access import AccessLog
from .observe.activity import Activity
from .retries.idempotency import marker as idempotency_marker
from .retries.idempotency import rate_only
from .retries.recording import Recording
from .storage import FileStore, StorageError
from .types import ASGIApp, Message, Receive, Scope, Send
from .upstream.call import Call, SendUpstream, client_sender
from .upstream.kinds import makes
from .upstream.pool import Tries
from .upstream.relay import Relay
from .upstream.storing import Storing
from .upstream.targets import Target, Upstreams
from .upstream.transport import create_transport, sender_for
from .views import budget_view, files_view, kept_view, models_view
from .wire.errors import ClientGone, ProxyError, expect_method, send_error
from .wire.headers import ResponseHeaders
from .wire.incoming import open_upload, read_upload
from .wire.json_upload import Incoming
from .wire.request import (
    ImageRequest,
    check_content_type,
    parse_request,
    read_body,
)
from .wire.routing import Router, check_route
from .wire.upload import Upload
from .wire.usage import Usage

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .observe.tracing import RequestTrace

logger = logging.getLogger("imagegen_proxy")


class ImageGenProxy:
    """Serves `POST .../images/generations` in front of `app`; everything else goes to `app`.

    The hooks default to what `config` describes: `authenticator` to the `[[keys]]` and
    `[[projects]]` tables (or open access), `rate_limiter` to the `[limits]` storage, which
    also keeps the budgets. Costs come from the shipped price table and `[prices]`.

    `http_client` replaces the default upstream transport (the proxy then never closes it).
    Without one, the transport is created on first use (Django never sends lifespan) and
    closed on lifespan shutdown, when the server sends it, or by `aclose()`.

    Each request ends with one access log line (`[access_log]`) and, with `[metrics]`
    enabled, its Prometheus metrics. With `[tracing]` enabled, or an app's own
    `tracer_provider` (OpenTelemetry's), each is traced (`observe.tracing`).
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ProxyConfig,
        *,
        authenticator: Authenticator | None = None,
        rate_limiter: RateLimiter | None = None,
        usage_observers: Sequence[UsageObserver] = (),
        http_client: httpx.AsyncClient | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.app = app
        self.config = config
        listed = config.proxy.list_models
        # Where images are kept (`[storage]`); a `file://` store's files are served here.
        self.images = image_store_for(config)
        self._next_sweep = 0.0  # when kept images may be swept next (`retention_days`)
        self._sweeping: asyncio.Task[None] | None = None
        self.router = Router(
            config.proxy.mount_prefix,
            models=config.pooled if listed is None else listed,
            files=isinstance(self.images, FileStore),
            stored=self.images is not None,
        )
        self.upstreams = Upstreams(config)
        self.pool = pool_for(config, self.upstreams) if config.pooled else None
        self.store = store_for(config)
        self.authenticator = authenticator or authenticator_for(config, self.store)
        self.prices = Prices(config.prices)
        # What the gateway serves: the pool's models, or the priced ones through one upstream.
        priced = self.prices.models
        if self.pool is None:  # [openai] or [azure]: OpenAI's API makes what it makes
            self.models = [model for model in priced if makes("openai", model)]
        else:
            self.models = self.pool.models(priced)
        self.admin = AdminPlane(
            config.proxy.mount_prefix,
            config.admin.digest,
            self.store,
            open=config.admin.open,
            models=self.models,
        )
        self.ledger = ledger_for(self.store)
        self.rate_limiter = rate_limiter or rate_limiter_for(config, self.store)
        self._owns_limiter = rate_limiter is None
        self.usage_observers = list(usage_observers)
        self._unpriced = config.limits.unpriced
        self._refuse_retired = config.limits.retired == "refuse"
        # Whether `/v1/models` leaves out what is shut down: no upstream could serve it.
        self._unlist_retired = self._refuse_retired and all(
            target.is_openai_api for target in self.upstreams.targets
        )
        self._key_headers = frozenset(
            {b"x-api-key", b"api-key", config.auth.virtual_key_header.encode()}
        )
        self._max_body = config.proxy.max_body_bytes
        self._body_timeout = config.proxy.body_timeout
        self._response_headers = ResponseHeaders(config.proxy.forward_response_headers)
        self._given_client = None if http_client is None else client_sender(http_client)
        self.transport: httpx.AsyncBaseTransport | None = None
        self._send_upstream: SendUpstream | None = None
        self.access_log = AccessLog(config.access_log) if config.access_log.enabled else None
        self.activity = Activity()
        settings = config.idempotency
        self.idempotency = idempotency_for(config)
        self._sdk_retries = settings.sdk_retries
        # A repeat of a generation running in another process waits at most this long.
        self._repeat_wait = max((m.read_timeout for m in config.members()), default=600.0)
        self.metrics = metrics_for(config, self.pool)
        self.tracing = tracing_for(config, tracer_provider)

    def _sender(self) -> SendUpstream:
        if self._given_client is not None:
            return self._given_client
        if self._send_upstream is None:
            self.transport = create_transport(self.config.proxy)
            self._send_upstream = sender_for(self.transport)
        return self._send_upstream

    async def aclose(self) -> None:
        """Close what this proxy created: its upstream transport (a later request makes a
        new one), the Redis connections of its limiter and pool, and its store (after the ledger has
        written what waits)."""
        transport, self.transport, self._send_upstream = self.transport, None, None
        if transport is not None:
            await transport.aclose()
        if self._owns_limiter:
            await self.rate_limiter.aclose()
        if self.pool is not None and self.pool.mirror is not None:
            await self.pool.mirror.aclose()
        if self.ledger is not None:
            await self.ledger.aclose()
        if self.store is not None:
            await self.store.aclose()
        if self.images is not None:
            await self.images.aclose()
        if self.tracing is not None:
            await self.tracing.aclose()
        if self.idempotency is not None:
            if self.idempotency.shared is not None:
                await self.idempotency.shared.aclose()
            self.idempotency.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.router.match(scope) if scope["type"] == "http" else None
        if route is None:
            if scope["type"] == "lifespan":
                send = self._lifespan(send)
            await self.app(scope, receive, send)
            return
        if route.operation == "budget":
            await budget_view(scope, send, self.authenticator, self.rate_limiter, self._key_headers)
            return
        if route.operation == "models":
            await models_view(scope, send, self.authenticator, self._key_headers, self._listed())
            return
        if route.operation == "admin":
            await self.admin(scope, receive, send)
            return
        if route.operation == "files":
            assert isinstance(self.images, FileStore)
            await files_view(scope, send, self.images, self.router.prefix)
            return
        if route.operation == "images":
            assert self.images is not None
            await kept_view(
                scope,
                send,
                self.authenticator,
                self._key_headers,
                self.store,
                self.images,
                self.config.storage.url_ttl,
                self.config.admin.digest,
                self.router.prefix,
            )
            return
        generation = Generation(
            route.form, route.operation, client_request_id=client_request_id(scope)
        )
        trace = None if self.tracing is None else self.tracing.begin(scope, route, generation)
        upload = recording = None
        try:
            expect_method(scope, "POST")
            check_route(route)
            self.upstreams.check(route.operation)
            # Who is asking comes first, from the headers alone: nothing of a stranger's
            # body is read, parsed or turned into a log field or metric label.
            credentials = read_credentials(scope, self._key_headers)
            if trace is None:
                principal = await self.authenticator.authenticate(credentials)
            else:
                with trace.phase("imagegen.authenticate"):
                    principal = await self.authenticator.authenticate(credentials)
            generation.identify(principal)
            if route.operation == "generation":
                check_content_type(scope)
                body = await read_body(scope, receive, self._max_body, self._body_timeout)
                request = parse_request(route, body)
            else:
                settings = self.config.proxy
                upload = open_upload(
                    scope,
                    receive,
                    route.operation,
                    max_bytes=settings.max_upload_bytes,
                    max_files=settings.max_upload_files,
                    within=self._body_timeout,
                )
                request = await read_upload(route, upload)
            storing = self._storing(generation, request, upload)
            if storing is not None:
                request = request.for_storage()
            generation.describe(request)
            check_policy(principal, request)
            if self.idempotency is not None and route.operation == "generation":
                marker = idempotency_marker(scope, principal, body, self._sdk_retries)
                if marker is not None:
                    found = self.idempotency.find(marker)
                    if found is None and self.idempotency.shared is not None:
                        wait = self._repeat_wait
                        found = await self.idempotency.shared.claim(marker, generation.id, wait)
                    if found is not None:
                        await self._replay(principal, request, found, generation, receive, send)
                        return
                    recording = self.idempotency.start(marker, generation.id)
            price, reservation = self.prices.reserve(principal, request, self._unpriced)
            generation.reserved = reservation
            targets = self._candidates(request, principal)
            if self._refuse_retired:
                self.prices.check_retired(request, all(t.is_openai_api for t in targets))
            if trace is None:
                await self._admit(generation, principal, request, reservation)
            else:
                with trace.limits():
                    await self._admit(generation, principal, request, reservation)
            generation.price = price
            await self._generate(
                generation, scope, receive, send, upload, targets, recording, storing, trace
            )
        except ProxyError as error:
            if recording is not None:
                recording.fail(error)  # who joined it gets the same answer
            generation.refused(error)
            generation.bytes_out = await send_error(send, error, generation.id)
        except ClientGone:
            generation.gone()
        except Exception:
            # The relay answers its own failures once the response has started, so
            # anything that reaches here happened before: a 500 can still be sent.
            logger.exception("internal error while proxying %s", scope["path"])
            internal = ProxyError(
                500,
                "The proxy failed to handle the request.",
                type="server_error",
                code="internal_error",
            )
            generation.refused(internal)
            generation.bytes_out = await send_error(send, internal, generation.id)
        finally:
            if upload is not None:
                await upload.aclose()
            if recording is not None:
                assert self.idempotency is not None
                if not recording.ended:
                    self.idempotency.ended(recording)
                recording.let_go()
            if trace is not None:
                trace.finish()
            self._observe(generation)

    async def _admit(
        self, generation: Generation, principal: Principal, request: ImageRequest, reserved: int
    ) -> None:
        """The limits admit `request` (`generation.decision`), or their refusal is raised."""
        decision = await self.rate_limiter.acquire(principal, request, reserved)
        if not decision.allowed:
            generation.limit = decision.limit or decision.code
            raise decision.refusal()
        generation.decision = decision

    def _listed(self) -> list[tuple[str, str | None]]:
        """What `/v1/models` lists: each model and its shutdown date (what is shut down is
        left out where no upstream could serve it)."""
        today = datetime.now(UTC).date()
        prices = self.prices
        return [
            (model, None if day is None else day.isoformat())
            for model in self.models
            if not (self._unlist_retired and prices.shut_down(model, today))
            for day in [prices.shutdown_date(model)]
        ]

    def _observe(self, generation: Generation) -> None:
        try:
            self.activity.ended(generation)
            if self.access_log is not None:
                self.access_log.emit(generation)
            if self.metrics is not None:
                self.metrics.ended(generation)
            if self.ledger is not None and generation.reached:
                self.ledger.add(generation.ledger_row())
        except Exception:
            logger.exception("recording request %s failed", generation.id)

    async def _generate(
        self,
        generation: Generation,
        scope: Scope,
        receive: Receive,
        send: Send,
        upload: Incoming | None,
        targets: list[Target],
        recording: Recording | None = None,
        storing: Storing | None = None,
        trace: RequestTrace | None = None,
    ) -> None:
        request, principal, decision = generation.request, generation.principal, generation.decision
        assert request is not None and principal is not None and decision is not None
        headers = [(k.encode(), v.encode()) for k, v in decision.headers()]
        api_key = principal.upstream_api_key
        request_id = generation.client_request_id or generation.id

        def build(target: Target) -> Call:
            return self.upstreams.build(request, target, scope, api_key, request_id, upload)

        tries = Tries(targets, build, self.pool, api_key)
        generation.failovers = tries.failovers
        attempts = tries if trace is None else trace.attempts(tries)
        relay = Relay(
            self._sender(),
            send if recording is None else recording.tee(send),
            generation,
            headers=headers,
            on_end=self._settle,
            response_headers=self._response_headers,
            total_timeout=targets[0].total_timeout,
            max_bytes=self.config.proxy.max_response_bytes,
            storing=storing,
        )
        generation.upstream, generation.admitted = targets[0].name, True
        self.activity.started(generation)
        if self.metrics is not None:
            self.metrics.started(generation)
        try:
            await relay.run(
                attempts, receive if recording is None else recording.receiving(receive), upload
            )
        finally:
            if storing is not None:
                generation.stored = list(storing.keys)
            await self._settle(generation)
            generation.relayed()

    def _storing(
        self, generation: Generation, request: ImageRequest, upload: Incoming | None
    ) -> Storing | None:
        """How the request's images go to the store: as URLs when the client asks for
        them (`response_format="url"`), or copied besides with `keep = "always"`."""
        if self.images is None:
            return None
        if isinstance(upload, Upload):
            asked = upload.fields.get("response_format")
        else:
            asked = getattr(request.body, "response_format", None)
        settings = self.config.storage
        if asked != "url" and settings.keep != "always":
            return None
        if settings.retention_days is not None:
            self._sweep_soon(settings.retention_days)
        return Storing(
            self.images,
            project=generation.project,
            request_id=generation.id,
            ttl=settings.url_ttl,
            as_url=asked == "url",
            inline=settings.on_error == "inline",
        )

    def _sweep_soon(self, days: int) -> None:
        """Delete kept images older than `days`, in the background, at most hourly."""
        now = time.monotonic()
        if now < self._next_sweep or self.images is None:
            return
        self._next_sweep = now + 3600
        store = self.images

        async def sweep() -> None:
            cutoff = datetime.now(UTC) - timedelta(days=days)
            try:
                gone = await store.sweep(cutoff)
            except StorageError as exc:
                logger.warning("storage sweep failed: %s", exc)
                return
            if gone:
                logger.info("storage sweep deleted %d images older than %d days", gone, days)

        self._sweeping = asyncio.get_running_loop().create_task(sweep())

    async def _settle(self, generation: Generation) -> None:
        """Once per generation, whatever ended it (even a cancellation): its slot goes back
        and what it spent is told; what may have been billed upstream stays spent, even if
        the client left. The relay calls it before the response's last byte, so a client's
        next request already finds its slot free."""
        if generation.settled:
            return
        generation.settled = True
        trace = generation.trace
        if trace is None:
            await self._spend(generation)
            return
        with trace.settle():
            await self._spend(generation)

    async def _spend(self, generation: Generation) -> None:
        request, principal, decision = generation.request, generation.principal, generation.decision
        assert request is not None and principal is not None and decision is not None
        spent = None
        if generation.charged:
            # Without the upstream's usage (the client left before it came), the
            # reservation is what it cost: the upstream may well bill it.
            price, usage = generation.price, generation.usage
            cost = 0 if price is None else price.cost(request, usage)
            spent = (usage or Usage()) + Usage(requests=1, images=request.images, cost_micros=cost)
            generation.cost_micros = None if price is None else cost
            if generation.over_reservation:
                # Above the worst case the price table allows: the table is out of date, or
                # the upstream's usage is wrong. Kept, as billed; said.
                logger.warning(
                    "request %s: usage cost $%s, above its reservation of $%s (%s)",
                    generation.id,
                    usd(cost),
                    usd(generation.reserved),
                    request.model,
                )
        if decision.release is not None:
            await decision.release(spent)
        if spent is not None:
            await self._record(principal, request, spent)

    async def _replay(
        self,
        principal: Principal,
        request: ImageRequest,
        recording: Recording,
        generation: Generation,
        receive: Receive,
        send: Send,
    ) -> None:
        """Answer a repeat from the generation it repeats: joined as it runs, or replayed
        once it finished. It counts against the request rate limits alone."""
        try:
            decision = await self.rate_limiter.acquire(rate_only(principal), request, 0)
            if not decision.allowed:
                generation.limit = decision.limit or decision.code
                raise decision.refusal()
            generation.outcome, generation.replay_of = "replayed", recording.request_id
            try:
                generation.bytes_out = await recording.stream(receive, send)
                generation.status = recording.start["status"] if recording.start else 0
            finally:
                if decision.release is not None:
                    await decision.release(None)
        finally:
            recording.detach()

    def _candidates(self, request: ImageRequest, principal: Principal) -> list[Target]:
        """The upstreams to try: the one of old without a pool, else the pool's order."""
        if self.pool is None:
            return [self.upstreams.target(request)]
        return self.pool.candidates(request, principal.upstream_api_key)

    async def _record(self, principal: Principal, request: ImageRequest, usage: Usage) -> None:
        for observer in self.usage_observers:
            try:
                await observer.record(principal, request, usage)
            except Exception:
                logger.exception("usage observer %r failed", observer)

    def _lifespan(self, send: Send) -> Send:
        """The host's lifespan messages, heard on their way: the pool's mirror starts with
        the server, and what the proxy opened closes with it."""

        async def send_closing(message: Message) -> None:
            pool = self.pool
            if message["type"] == "lifespan.startup.complete" and pool and pool.mirror:
                pool.mirror.start()
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
                if self.metrics is not None:
                    self.metrics.process_ending()
            await send(message)

        return send_closing
