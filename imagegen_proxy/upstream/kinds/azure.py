"""Azure OpenAI (`[azure]`, `kind = "azure"`): an endpoint, deployments in the path, an
`api-version` in the query, the key in `api-key`; no variations."""

from __future__ import annotations

from urllib.parse import quote

from cachetools import LRUCache

from ...config import AzureMember
from ...wire.errors import ProxyError
from ...wire.request import ImageRequest
from ...wire.routing import ENDPOINTS, ImageOperation, is_valid_deployment
from ..call import TextHeaders
from .base import Located


class Azure:
    """An Azure OpenAI resource."""

    is_openai_api = False
    system = "azure.ai.openai"

    def __init__(self, member: AzureMember) -> None:
        self.headers: TextHeaders = []
        self._base = member.endpoint + "/openai/deployments/"
        self.api_version = member.api_version
        self.deployments = member.deployments
        self._urls: LRUCache[tuple[str, str, str], str] = LRUCache(maxsize=1024)

    def credentials(self, key: str | None) -> TextHeaders:
        return [] if key is None else [("api-key", key)]

    def serves(self, operation: ImageOperation) -> bool:
        return operation != "variation"

    def locate(self, request: ImageRequest, pooled: bool) -> Located:
        if request.deployment is not None and not pooled:
            deployment = request.deployment  # the client named it
        else:
            deployment = self.deployment_for(request.model)
        return Located(self.url(deployment, request.api_version, request.operation))

    def url(self, deployment: str, api_version: str | None, operation: ImageOperation) -> str:
        endpoint = ENDPOINTS[operation]
        key = (deployment, api_version or self.api_version, endpoint)
        url = self._urls.get(key)
        if url is None:
            # Both parts were checked against conservative patterns; quote() is belt and braces.
            path = quote(deployment, safe="")
            version = quote(key[1], safe="")
            url = f"{self._base}{path}/images/{endpoint}?api-version={version}"
            self._urls[key] = url
        return url

    def deployment_for(self, model: str | None) -> str:
        """The deployment for `model` (`deployments[model]`, else the model's own name)."""
        if model is None:
            raise ProxyError(
                400,
                "Missing required parameter: 'model' (it names the Azure deployment).",
                param="model",
                code="missing_required_parameter",
            )
        deployment = self.deployments.get(model, model)
        if not is_valid_deployment(deployment):
            raise ProxyError(
                400,
                f"Invalid value for 'model': {model!r} is not a valid deployment name.",
                param="model",
                code="invalid_value",
            )
        return deployment
