"""Which requests are ours: path matching for the OpenAI and Azure forms."""

from __future__ import annotations

import re
from typing import Literal, NamedTuple
from urllib.parse import parse_qsl

from ..types import Scope
from .errors import ProxyError

Form = Literal["openai", "azure"]
# What a request asks for: an image operation (sent upstream), or the proxy's own views.
ImageOperation = Literal["generation", "edit", "variation"]
Operation = Literal[ImageOperation, "budget", "admin", "models", "files", "images"]

# Each image operation's last path segment, upstream as here.
ENDPOINTS: dict[ImageOperation, str] = {
    "generation": "generations",
    "edit": "edits",
    "variation": "variations",
}
_OPENAI_PREFIXES = ("/v1/images/", "/images/", "/openai/v1/images/", "/openai/images/")
OPENAI_PATHS = tuple(
    prefix + endpoint for endpoint in ENDPOINTS.values() for prefix in _OPENAI_PREFIXES
)
# A client's own view of its limits, budgets and spending (GET).
BUDGET_PATHS = ("/v1/imagegen/budget", "/imagegen/budget")
# The models served (GET): the proxy answers them with a pool, in the bundled proxy, or
# with `[proxy] list_models`; otherwise they are the host app's.
MODELS_PATHS = ("/v1/models", "/models", "/openai/v1/models")
# Images kept by a `file://` store, at signed, expiring URLs (GET).
FILES_PATH = "/v1/imagegen/files/"
# A generation's kept images, their URLs issued again (GET, the owner's key or the admin's).
IMAGES_PATH = "/v1/imagegen/images/"
# OpenAI's Admin API, for the admin key.
ADMIN_PATHS = ("/v1/organization/", "/organization/")
# Deliberately loose: anything between the fixed parts is captured, so that a bad
# deployment id (empty, "a/b" decoded from "a%2Fb", "..") is refused with a 400
# instead of silently falling through to the host app.
# Azure has no variations.
_AZURE_PATH = re.compile(r"/openai/deployments/(.*)/images/(generations|edits)", re.DOTALL)

# Azure deployment names: letters, digits, '-', '_', '.'; at most 64 characters.
DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# e.g. "2025-04-01-preview", "preview", "v1".
API_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def is_valid_deployment(name: str) -> bool:
    return DEPLOYMENT_ID.fullmatch(name) is not None and ".." not in name


class Route(NamedTuple):
    """A matched proxy path: its form, and for the Azure form the deployment and api-version."""

    form: Form
    deployment: str | None = None
    api_version: str | None = None
    operation: Operation = "generation"


class Router:
    """Matches scopes against the proxy paths, optionally under a mount prefix."""

    def __init__(
        self, prefix: str = "", *, models: bool = False, files: bool = False, stored: bool = False
    ) -> None:
        self.prefix = prefix.rstrip("/")
        self._files = self.prefix + FILES_PATH if files else None
        self._images = self.prefix + IMAGES_PATH if stored else None
        self._models = {self.prefix + path for path in MODELS_PATHS} if models else set()
        self._openai = {
            self.prefix + prefix + endpoint: Route("openai", operation=operation)
            for operation, endpoint in ENDPOINTS.items()
            for prefix in _OPENAI_PREFIXES
        }
        self._budget = {self.prefix + path for path in BUDGET_PATHS}
        self._admin = tuple(self.prefix + path for path in ADMIN_PATHS)
        self._azure = re.compile(re.escape(self.prefix) + _AZURE_PATH.pattern, re.DOTALL)

    def match(self, scope: Scope) -> Route | None:
        """The route for an HTTP scope, or None when the path is not a proxy path."""
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        route = self._openai.get(path)
        if route is not None:
            return route
        if path in self._budget:
            return _BUDGET
        if path in self._models:
            return _MODELS
        if path.startswith(self._admin):
            return _ADMIN
        if self._files is not None and path.startswith(self._files):
            return _FILES
        if self._images is not None and path.startswith(self._images):
            return _IMAGES
        found = self._azure.fullmatch(path)
        if found is None:
            return None
        deployment, endpoint = found.groups()
        operation: ImageOperation = "edit" if endpoint == "edits" else "generation"
        return Route("azure", deployment, _api_version(scope.get("query_string", b"")), operation)


_BUDGET = Route("openai", operation="budget")
_MODELS = Route("openai", operation="models")
_ADMIN = Route("openai", operation="admin")
_FILES = Route("openai", operation="files")
_IMAGES = Route("openai", operation="images")


def check_route(route: Route) -> None:
    """Refuse deployment ids and api-versions that must never reach an upstream URL."""
    if route.deployment is not None and not is_valid_deployment(route.deployment):
        raise ProxyError(
            400,
            "Invalid deployment id in the path: use letters, digits, '-', '_' and '.' "
            "(at most 64 characters).",
            code="invalid_deployment",
        )
    if route.api_version is not None and API_VERSION.fullmatch(route.api_version) is None:
        raise ProxyError(
            400,
            "Invalid api-version query parameter.",
            param="api-version",
            code="invalid_api_version",
        )


def _api_version(query_string: bytes) -> str | None:
    if not query_string:
        return None
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "api-version":
            return value
    return None
