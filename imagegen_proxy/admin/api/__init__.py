"""OpenAI's Admin API over the store: projects, their service accounts, keys, rate limits,
model permissions and spend limit, in the shapes `OpenAI(admin_api_key=...).admin` parses.

`admin_routes(store)` are Starlette routes relative to `/organization`; whoever mounts them
checks the admin key. What the gateway adds to OpenAI's objects travels in one extra field,
`limits` (a `config.Policy`), which the SDK sends with `extra_body` and ignores in answers.
"""

from .shared import admin_routes

__all__ = ["admin_routes"]
