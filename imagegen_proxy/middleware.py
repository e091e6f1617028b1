"""`ImageGenProxy`: the pure-ASGI middleware that serves the image-generation paths."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, cast

import httpx

from .admin.plane import AdminPlane
from .assembly import (
    authenticator_for,
    idempotency_for,
    pool_for,
    rate_limiter_for,
    store_for,
)
from .config import ProxyConfig
from .governance.auth import (
    Authenticator,
    Principal,
    check_policy,
    may_use,
    read_credentials,
)
from .governance.pricing import Price, Prices, usd
from .governance.ratelimit import Decision, RateLimiter, UsageObserver
from .observe.access import AccessLog, Entry, client_request_id
from .observe.activity import Activity
from .retries.idempotency import marker as idempotency_marker
from .retries.idempotency import rate_only
from .retries.recording import Recording
from .types import ASGIApp, Message, Receive, Scope, Send
from .upstream.pool import Tries
from .upstream.relay import Outcome, Relay
from .upstream.targets import (
    Call,
    SendUpstream,
    Target,
    Upstreams,
    client_sender,
)
from .upstream.transport import create_transport, sender_for
from .wire.errors import ClientGone, ProxyError, expect_method, send_error, too_large
from .wire.headers import ResponseHeaders
from .wire.json_upload import Incoming, JsonUpload
from .wire.parts import boundary_of
from .wire.request import (
    ImageRequest,
    check_content_type,
    header,
    is_json,
    parse_form,
    parse_json_edit,
    parse_request,
    read_body,
)
from .wire.routing import ImageOperation, Route, Router, check_route
from .wire.upload import Upload
from .wire.usage import Usage

if TYPE_CHECKING:
    from .observe.metrics import Metrics
    from .store.ledger import LedgerRow, LedgerWriter
    from .store.seeding import Seedable

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
    enabled, its Prometheus metrics.
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
    ) -> None:
        self.app = app
        self.config = config
        listed = config.proxy.list_models
        self.router = Router(
            config.proxy.mount_prefix, models=config.pooled if listed is None else listed
        )
        self.upstreams = Upstreams(config)
        self.pool = pool_for(config, self.upstreams) if config.pooled else None
        self.store = store_for(config)
        self.authenticator = authenticator or authenticator_for(config, self.store)
        self.prices = Prices(config.prices)
        # What the gateway serves: the pool's models, or the priced ones through one upstream.
        priced = self.prices.models
        self.models = priced if self.pool is None else self.pool.models(priced)
        self.admin = AdminPlane(
            config.proxy.mount_prefix,
            config.admin.digest,
            self.store,
            open=config.admin.open,
            models=self.models,
        )
        self.ledger: LedgerWriter | None = None
        if self.store is not None:
            from .store.ledger import LedgerWriter

            self.ledger = LedgerWriter(self.store)
        self.rate_limiter = rate_limiter or rate_limiter_for(config)
        if rate_limiter is None and self.store is not None:
            # Budgets start from the ledger: a restart or a switch to Redis gives none back.
            from .store.seeding import LedgerSeeded

            self.rate_limiter = LedgerSeeded(
                cast("Seedable", self.rate_limiter),
                self.store,
                on_error=config.limits.on_storage_error,
            )
        self._owns_limiter = rate_limiter is None
        self.usage_observers = list(usage_observers)
        self._unpriced = config.limits.unpriced
        self._unpriced_seen: set[str] = set()
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
        self.metrics: Metrics | None = None
        if config.metrics.enabled:
            from .observe.metrics import Metrics

            self.metrics = Metrics.shared()
            if self.pool is not None:
                self.metrics.upstream_states.watch(self.pool)

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
            await self._budget(scope, send)
            return
        if route.operation == "models":
            await self._models(scope, send)
            return
        if route.operation == "admin":
            await self.admin(scope, receive, send)
            return
        entry = Entry(route.form, route.operation, client_request_id=client_request_id(scope))
        upload = recording = None
        try:
            expect_method(scope, "POST")
            check_route(route)
            self.upstreams.check(route.operation)
            # Who is asking comes first, from the headers alone: nothing of a stranger's
            # body is read, parsed or turned into a log field or metric label.
            credentials = read_credentials(scope, self._key_headers)
            principal = await self.authenticator.authenticate(credentials)
            entry.identify(principal)
            if route.operation == "generation":
                check_content_type(scope)
                body = await read_body(scope, receive, self._max_body, self._body_timeout)
                request = parse_request(route, body)
            else:
                upload = self._upload(scope, receive, route.operation)
                request = await read_upload(route, upload)
            entry.describe(request)
            check_policy(principal, request)
            if self.idempotency is not None and route.operation == "generation":
                marker = idempotency_marker(scope, principal, body, self._sdk_retries)
                if marker is not None:
                    found = self.idempotency.find(marker)
                    if found is None and self.idempotency.shared is not None:
                        wait = self._repeat_wait
                        found = await self.idempotency.shared.claim(marker, entry.id, wait)
                    if found is not None:
                        await self._replay(principal, request, found, entry, receive, send)
                        return
                    recording = self.idempotency.start(marker, entry.id)
            price, reservation = self._price(principal, request)
            entry.reserved = reservation
            targets = self._candidates(request, principal)
            if self._refuse_retired:
                self._check_retired(request, targets)
            decision = await self.rate_limiter.acquire(principal, request, reservation)
            if not decision.allowed:
                entry.limit = decision.limit or decision.code
                raise decision.refusal()
            await self._generate(
                principal,
                request,
                price,
                decision,
                entry,
                scope,
                receive,
                send,
                upload,
                targets,
                recording,
            )
        except ProxyError as error:
            if recording is not None:
                recording.fail(error)  # who joined it gets the same answer
            entry.refused(error)
            entry.bytes_out = await send_error(send, error, entry.id)
        except ClientGone:
            entry.gone()
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
            entry.refused(internal)
            entry.bytes_out = await send_error(send, internal, entry.id)
        finally:
            if upload is not None:
                await upload.aclose()
            if recording is not None:
                assert self.idempotency is not None
                if not recording.ended:
                    self.idempotency.ended(recording)
                recording.let_go()
            self._observe(entry)

    def _upload(self, scope: Scope, receive: Receive, operation: ImageOperation) -> Incoming:
        """The body of an edit or variation, refused from its headers if it can be: neither
        multipart nor (for an edit) JSON (415), or declaring more than `max_upload_bytes`
        (413)."""
        settings = self.config.proxy
        content_type = header(scope, b"content-type") or b""
        json_edit = operation == "edit" and is_json(content_type)
        boundary = b"" if json_edit else boundary_of(content_type)
        declared = header(scope, b"content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > settings.max_upload_bytes
        ):
            raise too_large(settings.max_upload_bytes)
        if json_edit:
            return JsonUpload(
                receive, max_bytes=settings.max_upload_bytes, within=self._body_timeout
            )
        return Upload(
            receive,
            boundary,
            max_bytes=settings.max_upload_bytes,
            max_files=settings.max_upload_files,
            within=self._body_timeout,
        )

    def _price(self, principal: Principal, request: ImageRequest) -> tuple[Price | None, int]:
        """The request's price and the worst-case cost to reserve against its budgets (0
        without a budget): a budget is never spent on a model whose price is unknown,
        unless `[limits] unpriced = "allow"` says so."""
        price = self.prices.get(request.model)
        if not principal.budgeted:
            return price, 0
        if price is not None:
            return price, price.estimate(request)
        if self._unpriced == "deny":
            raise ProxyError(
                403,
                f"The model {request.model!r} has no price, and this key spends on a budget: "
                "name a priced model (or ask the operator to add its price).",
                param="model",
                code="model_not_priced",
            )
        if request.model not in self._unpriced_seen and len(self._unpriced_seen) < 1000:
            self._unpriced_seen.add(str(request.model))
            logger.warning("model %r has no price: served on a budget at no cost", request.model)
        return None, 0

    def _check_retired(self, request: ImageRequest, targets: list[Target]) -> None:
        """Refuse a model OpenAI has shut down when every upstream it may go to is OpenAI's
        own API (an Azure deployment keeps its own dates, another OpenAI-compatible service
        its own models), naming the model OpenAI put in its place."""
        day = None if request.model is None else self.prices.shutdown_date(request.model)
        if day is None or day > datetime.now(UTC).date():
            return
        if not all(target.is_openai_api for target in targets):
            return
        model = str(request.model)
        instead = self.prices.replacement(model)
        message = f"The model '{model}' was shut down on {day.isoformat()}"
        message += f": use {instead} instead." if instead else "."
        raise ProxyError(404, message, param="model", code="model_not_found")

    async def _budget(self, scope: Scope, send: Send) -> None:
        """`GET /v1/imagegen/budget`: a client's own limits, spending and budgets."""
        try:
            expect_method(scope, "GET")
            credentials = read_credentials(scope, self._key_headers)
            principal = await self.authenticator.authenticate(credentials)
            now = time.time()
            standing = [one.json(now) for one in await self.rate_limiter.standing(principal)]
        except ProxyError as error:
            await send_error(send, error)
            return
        view = {
            "object": "imagegen.budget",
            "key": standing[0] if standing else {"name": principal.name},
            "project": standing[1] if len(standing) > 1 else None,
        }
        await send_json(send, view)

    async def _models(self, scope: Scope, send: Send) -> None:
        """`GET /v1/models`: the models the pool serves that the caller's key may use, in
        OpenAI's list shape (the SDK's `client.models.list()`)."""
        try:
            expect_method(scope, "GET")
            credentials = read_credentials(scope, self._key_headers)
            principal = await self.authenticator.authenticate(credentials)
        except ProxyError as error:
            await send_error(send, error)
            return
        today = datetime.now(UTC).date()
        models = [
            model
            for model in self.models
            if may_use(principal, model)
            and not (self._unlist_retired and self.prices.shut_down(model, today))
        ]
        view = {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "imagegen-proxy",
                    "shutdown_date": _iso(self.prices.shutdown_date(model)),
                }
                for model in models
            ],
        }
        await send_json(send, view)

    def _observe(self, entry: Entry) -> None:
        try:
            self.activity.ended(entry)
            if self.access_log is not None:
                self.access_log.emit(entry)
            if self.metrics is not None:
                self.metrics.ended(entry)
            if self.ledger is not None and entry.reached:
                self.ledger.add(ledger_row(entry))
        except Exception:
            logger.exception("recording request %s failed", entry.id)

    async def _generate(
        self,
        principal: Principal,
        request: ImageRequest,
        price: Price | None,
        decision: Decision,
        entry: Entry,
        scope: Scope,
        receive: Receive,
        send: Send,
        upload: Incoming | None,
        targets: list[Target],
        recording: Recording | None = None,
    ) -> None:
        settled = False

        async def settle(outcome: Outcome) -> None:
            # Once: the slot goes back and usage is told whatever ended the generation (even
            # a cancellation); what may have been billed upstream stays spent, even if the
            # client left. The relay calls it before the response's last byte, so a
            # client's next request already finds its slot free. It takes the outcome
            # rather than closing over the relay: a relay -> settle -> relay cycle would
            # leave every request's objects to the cyclic GC, whose full passes then stall
            # the event loop for milliseconds after a burst (bench/README.md).
            nonlocal settled
            if settled:
                return
            settled = True
            spent = None
            if outcome.charged:
                # Without the upstream's usage (the client left before it came), the
                # reservation is what it cost: the upstream may well bill it.
                cost = 0 if price is None else price.cost(request, outcome.usage)
                spent = (outcome.usage or Usage()) + Usage(
                    requests=1, images=request.images, cost_micros=cost
                )
                entry.cost_micros = None if price is None else cost
                if entry.over_reservation:
                    # Above the worst case the price table allows: the table is out of
                    # date, or the upstream's usage is wrong. Kept, as billed; said.
                    logger.warning(
                        "request %s: usage cost $%s, above its reservation of $%s (%s)",
                        entry.id,
                        usd(cost),
                        usd(entry.reserved),
                        request.model,
                    )
            if decision.release is not None:
                await decision.release(spent)
            if spent is not None:
                await self._record(principal, request, spent)

        headers = [(k.encode(), v.encode()) for k, v in decision.headers()]
        api_key, request_id = principal.upstream_api_key, entry.client_request_id or entry.id

        def build(target: Target) -> Call:
            return self.upstreams.build(request, target, scope, api_key, request_id, upload)

        tries = Tries(targets, build, self.pool, api_key)
        entry.failovers = tries.failovers
        relay = Relay(
            self._sender(),
            send if recording is None else recording.tee(send),
            images=request.images,
            headers=headers,
            request_id=entry.id,
            on_end=settle,
            response_headers=self._response_headers,
            total_timeout=targets[0].total_timeout,
            max_bytes=self.config.proxy.max_response_bytes,
        )
        entry.upstream, entry.admitted = targets[0].name, True
        self.activity.started(entry)
        if self.metrics is not None:
            self.metrics.started(entry)
        try:
            await relay.run(
                tries, receive if recording is None else recording.receiving(receive), upload
            )
        finally:
            await settle(relay.outcome)
            entry.relayed(relay.outcome, request.images)

    async def _replay(
        self,
        principal: Principal,
        request: ImageRequest,
        recording: Recording,
        entry: Entry,
        receive: Receive,
        send: Send,
    ) -> None:
        """Answer a repeat from the generation it repeats: joined as it runs, or replayed
        once it finished. It counts against the request rate limits alone."""
        try:
            decision = await self.rate_limiter.acquire(rate_only(principal), request, 0)
            if not decision.allowed:
                entry.limit = decision.limit or decision.code
                raise decision.refusal()
            entry.outcome, entry.replay_of = "replayed", recording.request_id
            try:
                entry.bytes_out = await recording.stream(receive, send)
                entry.status = recording.start["status"] if recording.start else 0
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


async def read_upload(route: Route, upload: Incoming) -> ImageRequest:
    """Read an upload until the fields that decide the request are known: the model (the
    Azure form has it in the path) and, for an edit, the prompt. A JSON edit is read to its
    end (its images to disk)."""
    if isinstance(upload, JsonUpload):
        return parse_json_edit(route, await upload.read(), upload)
    needed = {"model"} if route.form == "openai" else set()
    if route.operation == "edit":
        needed.add("prompt")
    fields = await upload.head(needed)
    # Until the body has been read to its end, more images may follow.
    images = upload.images if upload.done.is_set() else upload.max_files
    return parse_form(route, fields, images)


async def send_json(send: Send, view: dict[str, Any]) -> None:
    """A 200 answer of the proxy's own views (`/v1/imagegen/budget`, `/v1/models`)."""
    body = json.dumps(view).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def ledger_row(entry: Entry) -> LedgerRow:
    """The ledger's line for a generation that reached the upstream."""
    from .store.ledger import LedgerRow

    return LedgerRow(
        at=int(time.time()),
        request_id=entry.id,
        key_id=entry.key_id,
        key_name=entry.key or "",
        project_id=entry.project_id,
        project_name=entry.project,
        model=entry.model,
        source=f"image.{entry.operation}",
        size=entry.size,
        quality=entry.quality,
        n=entry.n or 1,
        images=entry.images,
        status=entry.status,
        outcome=entry.outcome,
        input_tokens=entry.input_tokens,
        output_tokens=entry.output_tokens,
        cost_micros=entry.cost_micros,
        duration_ms=round(entry.duration * 1000),
    )


def _iso(day: date | None) -> str | None:
    return None if day is None else day.isoformat()
