"""Who is calling: client credentials, the `Authenticator` hook, and the built-in key table."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..config import KeyConfig, Policy, ProjectConfig
from ..types import Scope
from ..wire.errors import ProxyError
from ..wire.request import ImageRequest

_UNLIMITED = Policy()


@dataclass(frozen=True, slots=True)
class Credentials:
    """The keys a request presents, whatever the scheme (Bearer, Basic, key headers)."""

    keys: frozenset[bytes] = frozenset()
    username: bytes | None = None  # from Basic
    malformed: bool = False


@dataclass(frozen=True, slots=True)
class Project:
    """A group of keys with shared limits and budget, and limits for some models alone."""

    name: str
    policy: Policy = _UNLIMITED
    per_model: Mapping[str, Policy] = field(default_factory=dict)
    id: str | None = None  # the store's id, for a project kept there


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a name (for limits and logs, never the key), its policy, and
    the project whose limits apply too."""

    name: str
    policy: Policy = _UNLIMITED
    upstream_api_key: str | None = None  # spend on this upstream key instead of the proxy's
    project: Project | None = None
    id: str | None = None  # the store's id, for a key kept there
    organization: Policy | None = None  # limits every key is held to (a store's spend limit)

    @property
    def budgeted(self) -> bool:
        """Whether a dollar budget holds it: its own, its project's or its organization's."""
        return any(
            policy is not None and policy.budget_usd is not None
            for policy in (
                self.policy,
                None if self.project is None else self.project.policy,
                self.organization,
            )
        )


class Authenticator(Protocol):
    """Turns credentials into a principal, or refuses with a `ProxyError` (401, 403).

    It is asked before the request body is read: what the request asks for is checked
    afterwards, against the principal's policy and limits.
    """

    async def authenticate(self, credentials: Credentials) -> Principal: ...


def read_credentials(scope: Scope, key_headers: frozenset[bytes]) -> Credentials:
    keys: set[bytes] = set()
    username = None
    malformed = False
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            scheme = scheme.lower()
            if scheme == b"bearer" and token:
                keys.add(token)
            elif scheme == b"basic" and (basic := _basic(token)) is not None:
                username = basic[0]
                keys.add(basic[1])
            else:
                malformed = True
        elif name in key_headers:
            if value.strip():
                keys.add(value.strip())
            else:
                malformed = True
    return Credentials(frozenset(keys), username, malformed)


def _basic(token: bytes) -> tuple[bytes, bytes] | None:
    try:
        decoded = base64.b64decode(token, validate=True)
        decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon and password else None


def is_admin(scope: Scope, digest: bytes | None) -> bool:
    """Whether the request carries the `[admin]` key (its SHA-256 is `digest`) as
    `Authorization: Bearer`, what the SDK's `admin_api_key` sends."""
    if digest is None:
        return False
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"bearer":
                return False
            return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), digest)
    return False


def unauthorized(message: str) -> ProxyError:
    return ProxyError(
        401,
        message,
        code="invalid_api_key",
        headers=[("www-authenticate", 'Bearer realm="imagegen-proxy"')],
    )


class OpenAccess:
    """`[auth] open = true`: everybody is the unlimited principal "anonymous"."""

    async def authenticate(self, credentials: Credentials) -> Principal:
        return Principal("anonymous")


class KeyTable:
    """The built-in authenticator: the `[[keys]]` of the configuration.

    Keys are recognised by their SHA-256 digests (`key_sha256` keeps even the key itself
    out of the configuration). A presented key is hashed and looked up by digest: what the
    lookup's timing can reveal is about digests of the caller's own guesses, which says
    nothing about any key, so no constant-time compare is needed after it.
    """

    def __init__(self, keys: Sequence[KeyConfig], projects: Sequence[ProjectConfig] = ()) -> None:
        groups = {entry.name: Project(entry.name, _policy(entry)) for entry in projects}
        self._by_digest = {
            entry.digest: (  # computed once here, not per request
                entry,
                Principal(
                    entry.name,
                    _policy(entry),
                    None
                    if entry.upstream_api_key is None
                    else entry.upstream_api_key.get_secret_value(),
                    None if entry.project is None else groups[entry.project],
                ),
            )
            for entry in keys
        }

    async def authenticate(self, credentials: Credentials) -> Principal:
        principal = self.find(presented_digest(credentials), credentials.username)
        if principal is None:
            raise unauthorized("Incorrect API key provided.")
        return principal

    def find(self, digest: bytes, username: bytes | None = None) -> Principal | None:
        """The principal of the configured key whose SHA-256 is `digest`, if any."""
        found = self._by_digest.get(digest)
        if found is None:
            return None
        entry, principal = found
        if entry.username is not None and not hmac.compare_digest(
            username or b"", entry.username.encode()
        ):
            return None
        return principal


def presented_digest(credentials: Credentials) -> bytes:
    """The SHA-256 of the one key `credentials` present; 401 for none, several or a
    malformed one."""
    if credentials.malformed:
        raise unauthorized("Malformed credentials: use 'Authorization: Bearer KEY'.")
    if not credentials.keys:
        raise unauthorized(
            "Missing API key: send it as 'Authorization: Bearer KEY' (or Basic, "
            "x-api-key, api-key)."
        )
    if len(credentials.keys) > 1:
        raise unauthorized("Several different API keys were sent: send one.")
    (key,) = credentials.keys
    return hashlib.sha256(key).digest()


def _policy(entry: Policy) -> Policy:
    return Policy.model_validate(entry.model_dump(include=set(Policy.model_fields)))


def may_use(principal: Principal, model: str) -> bool:
    """Whether the principal's and its project's model lists let it use `model`."""
    project = principal.project
    return principal.policy.allows(model) and (project is None or project.policy.allows(model))


def check_policy(principal: Principal, request: ImageRequest) -> None:
    """Refuse (403) a model or deployment outside the allow-list of the principal or of
    its project."""
    name = request.model
    holders = [(f"key '{principal.name}'", principal.policy)]
    if principal.project is not None:
        holders.append((f"project '{principal.project.name}'", principal.project.policy))
    for holder, policy in holders:
        allowed, denied = policy.models, policy.denied_models
        if allowed is not None and (name is None or name not in allowed):
            refusal = f"allowed: {', '.join(sorted(allowed))}"
        elif denied is not None and (name is None or name in denied):
            refusal = f"denied: {', '.join(sorted(denied))}"
        else:
            continue
        raise ProxyError(
            403,
            f"The {holder} may not use model {name!r}; {refusal}.",
            type="invalid_request_error",
            param="model",
            code="model_not_allowed",
        )
