"""OpenAI's Admin API over the store: projects, their service accounts, keys, rate limits,
model permissions and spend limit, in the shapes `OpenAI(admin_api_key=...).admin` parses.

`admin_routes(store)` are Starlette routes relative to `/organization`; whoever mounts them
checks the admin key. What the gateway adds to OpenAI's objects travels in one extra field,
`limits` (a `config.Policy`), which the SDK sends with `extra_body` and ignores in answers.
One module per resource; `shared` holds what they have in common.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute

from ...store import Store
from ...store.admin import Admin
from . import policy, projects, rate_limits, service_accounts


def admin_routes(store: Store, models: Sequence[str] = ()) -> list[BaseRoute]:
    """The Admin API's routes for `store`, relative to `/organization`; `models` are those
    the gateway serves (a project lists a rate limit for each)."""
    admin = Admin(store, models)
    return [
        *policy.organization_routes(admin),
        *projects.routes(admin),
        *service_accounts.routes(admin),
        *rate_limits.routes(admin),
        *policy.project_routes(admin),
    ]


__all__ = ["admin_routes"]
