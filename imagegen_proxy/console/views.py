"""What each console page shows and does: the proxy's store (through the same `Store` and
`store.admin.Admin` the admin API and the command line use), its pool and its activity."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.templating import Jinja2Templates

from ..storage import StorageError
from . import forms
from .chart import dollars, stacked_bars
from .forms import PERIODS
from .spend import DAY, GROUPS, SpendQuery

if TYPE_CHECKING:
    from ..middleware import ImageGenProxy
    from ..store import Store
    from ..store.ledger import LedgerRow

OUTCOMES = ("ok", "upstream_error", "client_gone", "limited", "rejected", "error")
SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
DEFAULT_MODEL = "gpt-image-2.6-sunburst"  # the Playground's first choice: OpenAI's newest


class Pages:
    """The console's pages over one proxy."""

    def __init__(self, proxy: ImageGenProxy, templates: Jinja2Templates) -> None:
        self.proxy = proxy
        self.templates = templates
        templates.env.filters["dollars"] = dollars
        templates.env.filters["moment"] = forms.moment
        templates.env.filters["limits"] = forms.limits

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        config = self.proxy.config
        context.update(
            base=request.scope.get("root_path", ""),
            csrf=forms.csrf_token(request),
            open=config.admin.open,
            signed_in=config.admin.open or request.session.get("admin") is True,
            has_store=self.proxy.store is not None,
        )
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def refused(self, request: Request, message: str) -> Response:
        return self.render(request, "message.html", 403, title="Refused", message=message)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "message.html", 404, title="Not found", message="No such page.")

    def signin(
        self, request: Request, *, error: str | None, needs_key: bool = False, status: int = 200
    ) -> Response:
        return self.render(
            request,
            "signin.html",
            status,
            error=error,
            needs_key=needs_key,
            next=request.query_params.get("next", ""),
        )

    async def _store(self, request: Request) -> Store | Response:
        """The store, ready; or the page that says why there is none."""
        store = self.proxy.store
        if store is None:
            message = "This page needs a [store]: projects, keys and the ledger live there."
            return self.render(request, "message.html", 404, title="No store", message=message)
        try:
            await store.ready()
        except Exception:
            message = "The store is unavailable; try again shortly."
            return self.render(request, "message.html", 503, title="Store down", message=message)
        return store

    # --- overview ----------------------------------------------------------------------

    async def overview(self, request: Request, form: FormData | None) -> Response:
        from ..store.ledger import usage_lines

        today: dict[str, int] | None = None
        store = await self._store(request) if self.proxy.store is not None else None
        if isinstance(store, Response):
            return store
        if store is not None:
            now = int(datetime.now(UTC).timestamp())
            lines = await usage_lines(store, now - now % DAY, now + 1)
            line = lines[0] if lines else None
            today = {
                "requests": line.requests if line else 0,
                "images": line.images if line else 0,
                "cost_micros": line.cost_micros if line else 0,
            }
        return self.render(
            request,
            "overview.html",
            nav="overview",
            today=today,
            in_flight=self.proxy.activity.in_flight,
            upstreams=self._upstreams(),
            errors=self.proxy.activity.errors(),
        )

    def _upstreams(self) -> list[dict[str, Any]]:
        pool = self.proxy.pool
        found = []
        for target in self.proxy.upstreams.targets:
            state, seconds = pool.state(target) if pool is not None else ("up", None)
            found.append(
                {
                    "name": target.name,
                    "kind": target.kind,
                    "priority": target.priority,
                    "weight": target.weight,
                    "models": ", ".join(target.models) if target.models else "every model",
                    "state": state,
                    "seconds": None if seconds is None else round(seconds, 1),
                    "in_flight": pool.in_flight[target.name] if pool is not None else None,
                }
            )
        return found

    # --- spend -------------------------------------------------------------------------

    async def spend(self, request: Request, form: FormData | None) -> Response:
        store = await self._store(request)
        if isinstance(store, Response):
            return store
        try:
            query = SpendQuery(request)
        except ValueError as error:
            return self.render(request, "message.html", 400, title="Bad range", message=str(error))
        days, series, rows = await query.run(store)
        total = sum(row["cost_micros"] for row in rows)
        chart = stacked_bars(days, series, title=f"Spend per day by {query.by}")
        return self.render(
            request,
            "spend.html",
            nav="spend",
            query=query,
            groups=list(GROUPS),
            chart=chart,
            rows=rows,
            totals={
                "requests": sum(row["requests"] for row in rows),
                "images": sum(row["images"] for row in rows),
                "cost_micros": total,
            },
        )

    async def spend_csv(self, request: Request, form: FormData | None) -> Response:
        store = await self._store(request)
        if isinstance(store, Response):
            return store
        try:
            query = SpendQuery(request)
        except ValueError as error:
            return Response(str(error), status_code=400, media_type="text/plain")
        _, _, rows = await query.run(store)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["day", query.by, "requests", "images", "cost_usd"])
        for row in rows:
            cost = f"{row['cost_micros'] / 1_000_000:.6f}"
            writer.writerow([row["day"], row["group"], row["requests"], row["images"], cost])
        name = f"spend-{query.by}-{query.start}-{query.end}.csv"
        return Response(
            out.getvalue(),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    # --- projects and keys -------------------------------------------------------------

    async def keys(
        self,
        request: Request,
        form: FormData | None,
        *,
        shown: dict[str, str] | None = None,
        error: str | None = None,
        status: int = 200,
    ) -> Response:
        store = await self._store(request)
        if isinstance(store, Response):
            return store
        from ..store.admin import Admin

        projects = await store.projects()
        names = {project.id: project.name for project in projects}
        now = datetime.now(UTC).timestamp()
        keys = [
            {"record": key, "project": names.get(key.project_id or ""), "state": key.state(now)}
            for key in await store.keys()
        ]
        config = self.proxy.config
        return self.render(
            request,
            "keys.html",
            status,
            nav="keys",
            projects=projects,
            rate_limits=await Admin(store).rate_limits_set(),
            active=[project for project in projects if project.archived_at is None],
            keys=keys,
            config_projects=config.projects,
            config_keys=config.keys,
            shown=shown,
            error=error,
            periods=PERIODS,
        )

    async def _change(self, request: Request, form: FormData | None, change: Any) -> Response:
        """Run `change(store, form)`; on a mistake, the keys page again with the error."""
        from ..store import StoreError

        store = await self._store(request)
        if isinstance(store, Response):
            return store
        assert form is not None
        try:
            shown = await change(store, form)
        except (StoreError, ValueError) as exc:
            return await self.keys(request, form, error=forms.reason(exc), status=400)
        if shown is not None:  # a new key: shown on this answer only, never in a URL
            return await self.keys(request, form, shown=shown)
        return forms.redirect(request, "/keys")

    async def create_project(self, request: Request, form: FormData | None) -> Response:
        async def change(store: Store, form: FormData) -> None:
            from ..store.admin import Admin

            await Admin(store).create_project(forms.text(form, "name"), forms.policy(form))

        return await self._change(request, form, change)

    async def project_limits(self, request: Request, form: FormData | None) -> Response:
        project_id = request.path_params["id"]

        async def change(store: Store, form: FormData) -> None:
            from ..store.admin import Admin

            policy = forms.policy(form)
            limits = {
                "budget_usd": policy.budget_usd,
                "budget_period": policy.budget_period,
                "requests_per_minute": policy.requests_per_minute,
                "images_per_day": policy.images_per_day,
            }
            await Admin(store).modify_project(project_id, limits=limits)

        return await self._change(request, form, change)

    async def archive_project(self, request: Request, form: FormData | None) -> Response:
        project_id = request.path_params["id"]

        async def change(store: Store, form: FormData) -> None:
            from ..store.admin import Admin

            await Admin(store).archive_project(project_id)

        return await self._change(request, form, change)

    async def create_key(self, request: Request, form: FormData | None) -> Response:
        async def change(store: Store, form: FormData) -> dict[str, str]:
            days = forms.number(form, "expires_days")
            record, secret = await store.create_key(
                forms.text(form, "name"),
                project=str(form.get("project", "")) or None,
                policy=forms.policy(form),
                expires_in=None if days is None else days * DAY,
            )
            return {"name": record.name, "secret": secret, "what": "created"}

        return await self._change(request, form, change)

    async def revoke_key(self, request: Request, form: FormData | None) -> Response:
        key_id = request.path_params["id"]

        async def change(store: Store, form: FormData) -> None:
            await store.revoke_key(key_id)

        return await self._change(request, form, change)

    async def rotate_key(self, request: Request, form: FormData | None) -> Response:
        key_id = request.path_params["id"]

        async def change(store: Store, form: FormData) -> dict[str, str]:
            record, secret = await store.rotate_key(key_id)
            return {"name": record.name, "secret": secret, "what": "rotated"}

        return await self._change(request, form, change)

    # --- requests ----------------------------------------------------------------------

    async def requests(self, request: Request, form: FormData | None) -> Response:
        from ..store.ledger import latest

        store = await self._store(request)
        if isinstance(store, Response):
            return store
        filters = forms.filters(request)
        kind = request.query_params.get("kind", "").strip()
        rows = [] if kind else await latest(store, limit=200, filters=filters)
        return self.render(
            request,
            "requests.html",
            nav="requests",
            rows=rows,
            thumbs=await self._thumbs(rows),
            unanswered=forms.unanswered(self.proxy.activity.latest(), filters, kind),
            filters=filters,
            kind=kind,
            outcomes=OUTCOMES,
        )

    async def _thumbs(self, rows: list[LedgerRow]) -> dict[str, list[str]]:
        """Each listed generation's kept images, by request id: URLs for the page's
        thumbnails, valid ten minutes (none where the store cannot make them now)."""
        images = self.proxy.images
        found: dict[str, list[str]] = {}
        if images is None:
            return found
        for row in rows:
            if row.objects:
                try:
                    found[row.request_id] = [await images.url(key, 600) for key in row.objects]
                except StorageError:
                    return found
        return found

    async def request_json(self, request: Request, form: FormData | None) -> Response:
        """One ledger line as JSON (the playground shows its cost). The ledger is written
        in the background: what waits is written first."""
        from ..store.ledger import latest

        store = await self._store(request)
        if isinstance(store, Response):
            return store
        if self.proxy.ledger is not None:
            await self.proxy.ledger.flush()
        wanted = {"request_id": request.path_params["request_id"]}
        found = await latest(store, limit=1, filters=wanted)
        if not found:
            return JSONResponse({"error": "not in the ledger"}, status_code=404)
        row = found[0]
        return JSONResponse(
            {
                "request_id": row.request_id,
                "trace_id": row.trace_id,
                "model": row.model,
                "images": row.images,
                "outcome": row.outcome,
                "cost_usd": None if row.cost_micros is None else row.cost_micros / 1_000_000,
                "cost": None if row.cost_micros is None else dollars(row.cost_micros),
            }
        )

    # --- playground --------------------------------------------------------------------

    def _current_models(self) -> list[str]:
        """The models the gateway serves that are not shut down (the Playground's)."""
        today = datetime.now(UTC).date()
        found = []
        for model in self.proxy.models:
            shutdown = self.proxy.prices.shutdown_date(model)
            if shutdown is None or shutdown > today:
                found.append(model)
        return found or [DEFAULT_MODEL]

    async def playground(self, request: Request, form: FormData | None) -> Response:
        config = self.proxy.config
        return self.render(
            request,
            "playground.html",
            default_model=DEFAULT_MODEL,
            nav="playground",
            endpoint=config.proxy.mount_prefix + "/v1/images/generations",
            needs_key=not config.auth.open,
            models=self._current_models(),
            sizes=SIZES,
        )
