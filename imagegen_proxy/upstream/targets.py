"""Where a request goes: the configured upstreams (`Target`), and the upstream request
each normalized request becomes (`Upstreams.build`), for either form to any kind.

What a kind of upstream does its own way (URLs, credentials, the operations it serves) is
behind `kinds.Kind`, one module per kind. Headers going upstream are an allow-list, so no
client credential, cookie or forwarding header can leak through, whatever it is called.
"""

from __future__ import annotations

import functools

from ..config import ConfigError, Member, ProxyConfig
from ..types import Scope
from ..wire.errors import ProxyError
from ..wire.headers import FORWARDED_REQUEST, FORWARDED_REQUEST_PREFIX
from ..wire.json_upload import Incoming, JsonUpload
from ..wire.request import ImageGenerationBody, ImageRequest, upstream_response_format
from ..wire.routing import ImageOperation
from .call import Call, Content, TextHeaders, Timeouts
from .kinds import Job, Translating, kind_of

# The relay reads SSE event boundaries and usage: it must see the bytes as sent.
_BASE_HEADERS: TextHeaders = [("accept-encoding", "identity")]
_JSON = "application/json"


class Target:
    """One configured upstream: its name, its kind, its fixed headers and timeouts, computed
    once; in a pool, also the models it serves, its weight and its priority."""

    def __init__(self, member: Member) -> None:
        self.name = member.name
        self.kind = member.kind
        self.api = kind_of(member)  # what this kind of upstream does its own way
        # A kind that speaks its own API: its calls are made, and its answers translated.
        self.translating = self.api if isinstance(self.api, Translating) else None
        self.models = member.models
        self.weight, self.priority = member.weight, member.priority
        self.total_timeout = member.total_timeout
        self.is_openai_api = self.api.is_openai_api
        self._fixed = _BASE_HEADERS + self.api.headers
        key = None if member.api_key is None else member.api_key.get_secret_value()
        self.headers = self._fixed + self.api.credentials(key)
        self.timeouts = Timeouts(
            connect=member.connect_timeout,
            read=member.read_timeout,
            write=member.write_timeout,
            pool=member.pool_timeout,
        )

    def serves(self, model: str | None) -> bool:
        return self.models is None or model in self.models

    def call(
        self,
        url: str,
        content: Content,
        content_type: str,
        scope: Scope,
        api_key: str | None,
        request_id: str,
    ) -> Call:
        headers = [
            (key.decode("latin-1"), value.decode("latin-1"))
            for key, value in scope["headers"]
            if key in FORWARDED_REQUEST or key.startswith(FORWARDED_REQUEST_PREFIX)
        ]
        headers.append(("x-client-request-id", request_id))
        headers.append(("content-type", content_type))
        if api_key is None:
            headers += self.headers
        else:  # this client spends on its own upstream key
            headers += self._fixed + self.api.credentials(api_key)
        return Call(url, headers, content, self.timeouts)


class Upstreams:
    """Turns a normalized request into the upstream request, for either form to either
    kind of upstream.

    Without a pool (`[openai]` and `[azure]` alone), OpenAI-form requests go to `[openai]`
    when configured, else to `[azure]` with the deployment `deployments[model]` (or the
    model name); Azure-form requests go to `[azure]` when configured, else to `[openai]`
    with the deployment as the model. In a pool (`ProxyConfig.pooled`), `pool.Pool` orders
    the upstreams that serve the model, the Azure form's deployment id naming the model.
    """

    def __init__(self, config: ProxyConfig) -> None:
        if not config.has_upstream:
            raise ConfigError("no upstream configured: add an [openai] or [azure] section")
        self.pooled = config.pooled
        self.targets = [Target(member) for member in config.members()]
        self._openai = self._azure = None
        if not self.pooled:
            for target in self.targets:
                if target.kind == "openai":
                    self._openai = target
                else:
                    self._azure = target

    def build(
        self,
        request: ImageRequest,
        target: Target,
        scope: Scope,
        api_key: str | None,
        request_id: str,
        upload: Incoming | None = None,
    ) -> Call:
        """The upstream request to `target`; `api_key` replaces the configured upstream
        key, and `request_id` goes as `X-Client-Request-Id`, for the upstream's logs. An
        edit or variation sends the rest of its `upload` as it arrives. A kind that speaks
        its own API gets its configured key (a client's own key is for OpenAI's API) and
        no header of the client's."""
        if target.translating is not None:
            return self._translated(request, target, target.translating, upload)
        url, model = target.api.locate(request, self.pooled)
        content: Content
        if isinstance(upload, JsonUpload):
            edit = request.body
            assert isinstance(edit, ImageGenerationBody)
            if model is not None:
                edit = edit.model_copy(update={"model": model})
            content, content_type = upload.body(edit.to_json()), _JSON
        elif upload is not None:
            rewrite: dict[str, str | None] = {} if model is None else {"model": model}
            if request.stored:  # the images come back base64, for the store
                rewrite["response_format"] = upstream_response_format(model or request.model)
            content = upload.body(rewrite or None)
            content_type = upload.content_type.decode("latin-1")
        else:
            body = request.body
            assert isinstance(body, ImageGenerationBody)
            if model is not None:
                body = body.model_copy(update={"model": model})
            content, content_type = body.to_json(), _JSON
        call = target.call(url, content, content_type, scope, api_key, request_id)
        call.model = model or request.model
        return call

    def _translated(
        self,
        request: ImageRequest,
        target: Target,
        kind: Translating,
        upload: Incoming | None,
    ) -> Call:
        kind.check(request)
        url, model = kind.locate(request, self.pooled)
        assert model is not None
        job = Job(request, model, target.headers, target.timeouts, upload)
        exchange = functools.partial(kind.exchange, job)
        return Call(url, [], b"", target.timeouts, exchange=exchange, model=model)

    def target(self, request: ImageRequest) -> Target:
        """The upstream a request goes to without a pool."""
        if request.form == "azure":
            target = self._azure or self._openai
        else:
            target = self._openai or self._azure
        assert target is not None
        return target

    def check(self, operation: ImageOperation) -> None:
        """Refuse an operation no configured upstream serves (before anything is read)."""
        if not any(target.api.serves(operation) for target in self.targets):
            kinds = " or ".join(sorted({_NAMES.get(t.kind, t.kind) for t in self.targets}))
            raise ProxyError(
                404,
                f"Image {operation}s are not available on {kinds}, the only upstream "
                "this proxy has.",
                code="unsupported_operation",
            )


_NAMES = {  # for people
    "openai": "OpenAI",
    "azure": "Azure OpenAI",
    "gemini": "Gemini",
    "bfl": "Black Forest Labs",
    "stability": "Stability AI",
    "bedrock": "Amazon Bedrock",
}
