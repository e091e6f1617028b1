"""Amazon Bedrock's image models (`kind = "bedrock"`): Nova Canvas and Titan Image Generator
v2 through the runtime's `InvokeModel`, signed with SigV4 (botocore) or sent with a Bedrock
API key as a bearer token.

The answer is JSON with every image as base64 inside a string (`images[]`): it is read as a
stream of JSON events, and each string's pieces go on as they arrive. One call makes up to
five images, so `n` images are one call. A content-filter block arrives as a
`ValidationException` (or as an `error` with no image) and is answered as OpenAI's
`content_policy_violation`. Only generations: an edit would be Nova's `INPAINTING`, which
needs the upload's images inside the JSON and a mask of the other polarity. The mapping of
OpenAI's parameters and the error table are in docs/providers.md.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread

from ...config import BedrockMember, ConfigError
from ...wire.errors import ProxyError
from ...wire.jsonstream import Event
from ...wire.request import ImageRequest
from ..call import Answer, Call, SendUpstream, TextHeaders
from ..translated import (
    ImageStrings,
    Piece,
    Pieces,
    ProviderError,
    content_policy,
    translate,
)
from .base import Job, Located
from .provider import (
    ProviderKind,
    check_common,
    dimensions,
    failed,
    json_images,
    loads,
    unsupported,
)

NAME = "Amazon Bedrock"
MAX_IMAGES = 5  # Nova Canvas's and Titan's `numberOfImages`
# Nova Canvas's sizes: each side within these, a multiple of 16, at most 4:1, at most
# 2048x2048 pixels in all. Titan v2 takes fewer (a fixed list): it refuses the rest itself.
_SIDES = (320, 4096)
_MAX_PIXELS = 4_194_304
_DEFAULT_SIZE = (1024, 1024)  # for no size, or "auto"
# OpenAI's qualities (gpt-image's and dall-e-3's) as Bedrock's two.
_QUALITY = {
    "auto": "standard",
    "low": "standard",
    "medium": "standard",
    "standard": "standard",
    "high": "premium",
    "hd": "premium",
}
_JSON = "application/json"
_MAX_TEXT = 4096  # of the `error` string the reader keeps

# What an `x-amzn-errortype` says, as the status `failed` reads (the one error table every
# kind shares). A `ValidationException` about content filters is a moderation refusal.
_ERRORS = {
    "ValidationException": 400,
    "ResourceNotFoundException": 404,
    "AccessDeniedException": 403,
    "UnrecognizedClientException": 403,
    "InvalidSignatureException": 403,
    "IncompleteSignature": 403,
    "InvalidClientTokenId": 403,
    "MissingAuthenticationTokenException": 403,
    "ExpiredTokenException": 403,
    "ThrottlingException": 429,
    # Sent as a 400, it means "too many requests for the account's quota, try later": a
    # rate limit the pool may fail over from, not OpenAI's out-of-credits.
    "ServiceQuotaExceededException": 429,
    "ModelTimeoutException": 504,
    "ModelErrorException": 502,
    "ModelNotReadyException": 503,
    "ServiceUnavailableException": 503,
    "InternalServerException": 500,
    "InternalFailure": 500,
}
_POLICY_WORDS = ("content filter", "blocked")


def canvas(size: str | None) -> tuple[int, int]:
    """(width, height) for `size`; a 400 naming `size` when Nova Canvas cannot make it."""
    if size is None or size == "auto":
        return _DEFAULT_SIZE
    width, height = dimensions(size)
    low, high = _SIDES
    problem = None
    if not (low <= width <= high and low <= height <= high):
        problem = f"each side must be {low} to {high} pixels"
    elif width % 16 or height % 16:
        problem = "each side must be a multiple of 16"
    elif max(width, height) > 4 * min(width, height):
        problem = "the aspect ratio must be between 1:4 and 4:1"
    elif width * height > _MAX_PIXELS:
        problem = f"it makes at most {_MAX_PIXELS:,} pixels (2048x2048)"
    if problem is not None:
        raise unsupported("size", f"{NAME} cannot make size {size!r}: {problem}.")
    return width, height


def quality(asked: str | None) -> str | None:
    """Bedrock's `quality` for OpenAI's (None: not asked, Bedrock's default)."""
    if asked is None:
        return None
    found = _QUALITY.get(asked)
    if found is None:
        known = ", ".join(_QUALITY)
        raise unsupported("quality", f"{NAME} has no quality {asked!r} (one of {known}).")
    return found


class Bedrock(ProviderKind):
    """Bedrock's runtime in the member's region: SigV4 from `aws_access_key_id` and its
    secret, or from the standard AWS credential chain; or a Bedrock API key (`api_key`)."""

    name = NAME
    system = "aws.bedrock"

    def __init__(self, member: BedrockMember) -> None:
        super().__init__(member)
        self._signer: _SigV4 | None = None
        if member.api_key is None:
            secret = None
            if member.aws_secret_access_key_env is not None:
                secret = os.environ.get(member.aws_secret_access_key_env)
                if not secret:
                    raise ConfigError(
                        f"upstreams.{member.name}: environment variable "
                        f"{member.aws_secret_access_key_env} (aws_secret_access_key_env) "
                        "is not set"
                    )
            self._signer = _SigV4(member.region, member.aws_access_key_id, secret)

    def credentials(self, key: str | None) -> TextHeaders:
        if key is None:
            return []  # SigV4: signed at request time
        return [("authorization", f"Bearer {key}")]

    def check(self, request: ImageRequest) -> None:
        check_common(request, NAME, formats=("png",), max_n=MAX_IMAGES)
        canvas(request.size)
        quality(request.quality)

    def locate(self, request: ImageRequest, pooled: bool) -> Located:
        model = self.model_for(request)
        # Percent-encoded as botocore encodes a URI label (the ":" of a version too), so
        # the path sent is the path signed.
        return Located(f"{self.base_url}/model/{quote(model, safe='-_.~')}/invoke", model)

    def body(self, request: ImageRequest) -> bytes:
        width, height = canvas(request.size)
        config: dict[str, Any] = {}
        if request.body.n is not None:
            config["numberOfImages"] = request.body.n
        config |= {"width": width, "height": height}
        tier = quality(request.quality)
        if tier is not None:
            config["quality"] = tier
        value = {
            "taskType": "TEXT_IMAGE",
            "textToImageParams": {"text": request.prompt},
            "imageGenerationConfig": config,
        }
        return json.dumps(value).encode()

    async def exchange(self, job: Job, send: SendUpstream) -> Answer:
        body = self.body(job.request)
        url = self.locate(job.request, True).url
        headers: TextHeaders = [("content-type", _JSON), ("accept", _JSON)]
        if self._signer is not None:
            headers = await self._signer.signed(url, body, headers)
        call = Call(url, [*job.headers, *headers], body, job.timeouts)

        def shot() -> Pieces:
            return _images(send, call)

        return await translate(job.request, shot, 1)


def _images(send: SendUpstream, call: Call) -> Pieces:
    """One `InvokeModel` call: each of its images' base64 pieces as they arrive."""
    return json_images(send, call, NAME, _Reader(), aws_error)


class _Reader:
    """What one answer's JSON events say: image pieces go on; its `error`, small, is kept."""

    def __init__(self) -> None:
        self.image = ImageStrings("images.item", NAME)
        self.error = bytearray()

    @property
    def images(self) -> int:
        return self.image.images

    def read(self, events: list[Event]) -> list[Piece]:
        out: list[Piece] = []
        for prefix, kind, value in events:
            if self.image.take(prefix, kind, value, out):
                continue
            if prefix == "error" and kind == "string" and len(self.error) < _MAX_TEXT:
                assert isinstance(value, bytes)
                self.error += value[: _MAX_TEXT - len(self.error)]
        return out

    def usage(self) -> None:
        return None  # Bedrock reports no tokens: priced per image

    def refusal(self) -> ProviderError:
        said = self.error.decode(errors="replace")
        if _is_policy(said):
            return content_policy(f"{NAME} blocked the request: {said}")
        detail = f": {said[:200]}" if said else ""
        return ProviderError(
            502,
            f"{NAME} answered without an image{detail}",
            type="server_error",
            code="upstream_error",
        )


def _is_policy(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in _POLICY_WORDS)


def aws_error(answer: Answer, body: bytes) -> ProviderError:
    """Bedrock's error (`x-amzn-errortype`, `{"message"}`) as the client is told."""
    kind = (answer.header("x-amzn-errortype") or "").split(":", 1)[0]
    found = loads(body)
    message = None
    if isinstance(found, dict):
        said = found.get("message", found.get("Message"))
        message = said if isinstance(said, str) else None
    status = _ERRORS.get(kind, answer.status)
    policy = kind == "ValidationException" and message is not None and _is_policy(message)
    return failed(NAME, status, message, answer, policy=policy)


class _SigV4:
    """Signs each call with SigV4 for `bedrock` in `region`: with the configured key, or
    with the standard AWS credential chain's (environment, profile files, container or
    instance metadata), found once in a worker thread; refreshable credentials are frozen
    per request. The secret is never logged nor put in a message."""

    def __init__(self, region: str, access_key: str | None, secret: str | None) -> None:
        try:
            from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
            from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
            from botocore.credentials import Credentials  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ConfigError(
                "kind = 'bedrock' signs with botocore: pip install 'imagegen-proxy[bedrock]' "
                "(or set api_key to a Bedrock API key)"
            ) from exc
        self._auth = SigV4Auth
        self._request = AWSRequest
        self._region = region
        self._static = None if access_key is None else Credentials(access_key, secret)
        self._chain: Any = None
        self._lock = anyio.Lock()

    async def signed(self, url: str, body: bytes, headers: TextHeaders) -> TextHeaders:
        """`headers` with the signature's (`x-amz-date`, `authorization`, a session token)."""
        frozen = await self._frozen()
        request = self._request("POST", url, data=body, headers=dict(headers))
        self._auth(frozen, "bedrock", self._region).add_auth(request)
        return [(name.lower(), value) for name, value in request.headers.items()]

    async def _frozen(self) -> Any:
        if self._static is not None:
            return self._static.get_frozen_credentials()
        async with self._lock:
            if self._chain is None:
                self._chain = await anyio.to_thread.run_sync(_from_chain)
        # Refreshable credentials (a role's, instance metadata's) may refresh here: I/O.
        return await anyio.to_thread.run_sync(self._chain.get_frozen_credentials)


def _from_chain() -> Any:
    """The standard AWS credential chain's credentials. It may query instance metadata
    (IMDS) or a container's credential endpoint, so it runs in a worker thread."""
    import botocore.session  # type: ignore[import-untyped]

    try:
        credentials = botocore.session.get_session().get_credentials()
    except Exception as exc:
        raise ProxyError(
            502,
            f"The gateway could not get AWS credentials ({type(exc).__name__}).",
            type="server_error",
            code="upstream_auth_failed",
        ) from None
    if credentials is None:
        raise ProxyError(
            502,
            "The gateway found no AWS credentials for Amazon Bedrock; tell its operators.",
            type="server_error",
            code="upstream_auth_failed",
        )
    return credentials
