"""OpenAI, and any service that speaks its API (`[openai]`, `kind = "openai"`): a base URL,
the key as a bearer token, the operation in the path."""

from __future__ import annotations

from urllib.parse import urlsplit

from ...config import OpenAIMember
from ...wire.request import ImageRequest
from ...wire.routing import ENDPOINTS, ImageOperation
from ..call import TextHeaders
from .base import Located

OPENAI_API_HOST = "api.openai.com"


class OpenAI:
    """An OpenAI-compatible upstream."""

    system = "openai"

    def __init__(self, member: OpenAIMember) -> None:
        self.is_openai_api = urlsplit(member.base_url).hostname == OPENAI_API_HOST
        org, project = member.organization, member.project
        self.headers: TextHeaders = []
        self.headers += [("openai-organization", org)] if org else []
        self.headers += [("openai-project", project)] if project else []
        self.model_map = member.model_map
        self._urls = {
            operation: f"{member.base_url}/images/{endpoint}"
            for operation, endpoint in ENDPOINTS.items()
        }

    def credentials(self, key: str | None) -> TextHeaders:
        return [] if key is None else [("authorization", "Bearer " + key)]

    def serves(self, operation: ImageOperation) -> bool:
        return True

    def locate(self, request: ImageRequest, pooled: bool) -> Located:
        # An Azure-form request names a deployment: here, the model.
        model = request.deployment if request.form == "azure" else None
        if self.model_map:
            model = self.model_map.get(request.model or "", model)
        return Located(self._urls[request.operation], model)
