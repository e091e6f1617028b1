"""AWS Signature Version 4, checked on an incoming request with the standard library alone.

The canonical request is built the way botocore's `SigV4Auth` signs (which is what AWS's
SDKs send): the path as sent, dot segments and repeated slashes removed, then percent-encoded
once more (so `%3A` in a Bedrock model id is signed as `%253A`); the query's pairs sorted as
they were sent; each signed header lower-cased, its values' runs of white space collapsed and
repeats joined by commas; the payload's SHA-256, or `x-amz-content-sha256` when sent.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import quote

from ...types import Scope

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = 5 * 60
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_DATE_FORMAT = "%Y%m%dT%H%M%SZ"


class SignatureError(Exception):
    """A refusal, in AWS's terms: the HTTP status, the error type and its message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class Credential:
    """The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header."""

    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> Credential:
    """The header's credential scope, signed headers and signature; SignatureError
    (400 IncompleteSignatureException) when a part is missing or malformed."""
    algorithm, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    for item in rest.split(","):
        name, equals, content = item.strip().partition("=")
        if equals:
            params[name] = content
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if name not in params]
    if algorithm != ALGORITHM or missing:
        reasons = " ".join(f"Authorization header requires '{name}' parameter." for name in missing)
        raise SignatureError(
            400, "IncompleteSignatureException", f"{reasons} Authorization={value}"
        )
    scope = params["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not all(scope):
        raise SignatureError(
            400,
            "IncompleteSignatureException",
            "Credential should be scoped to a valid region and service, and end with"
            f" aws4_request: {params['Credential']}",
        )
    signed = tuple(params["SignedHeaders"].split(";"))
    return Credential(scope[0], scope[1], scope[2], scope[3], signed, params["Signature"])


def verify(
    scope: Scope,
    body: bytes,
    credential: Credential,
    *,
    secret: str,
    service: str,
    amz_date: str,
    now: float | None = None,
) -> None:
    """Check the request's signature with `secret`; SignatureError (403
    InvalidSignatureException) when the scope, the time or the signature is wrong."""
    if credential.service != service:
        raise SignatureError(
            403,
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: '{service}'.",
        )
    if credential.date != amz_date[:8]:
        raise SignatureError(
            403,
            "InvalidSignatureException",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from"
            f" HTTP: '{credential.date}' != '{amz_date[:8]}', from '{amz_date}'.",
        )
    _check_time(amz_date, time.time() if now is None else now)
    if "host" not in credential.signed_headers:
        raise SignatureError(
            403,
            "InvalidSignatureException",
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
        )
    declared = next(
        (value for name, value in scope["headers"] if name == b"x-amz-content-sha256"), None
    )
    if declared not in (None, UNSIGNED_PAYLOAD.encode(), hashlib.sha256(body).hexdigest().encode()):
        raise SignatureError(
            400,
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )
    request = canonical_request(scope, body, credential.signed_headers)
    digest = hashlib.sha256(request.encode()).hexdigest()
    scope_text = f"{credential.date}/{credential.region}/{credential.service}/aws4_request"
    to_sign = f"{ALGORITHM}\n{amz_date}\n{scope_text}\n{digest}"
    expected = signature(secret, credential.date, credential.region, credential.service, to_sign)
    if not hmac.compare_digest(expected.encode(), credential.signature.encode()):
        raise SignatureError(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided."
            " Check your AWS Secret Access Key and signing method. Consult the service"
            " documentation for details.",
        )


def _check_time(amz_date: str, now: float) -> None:
    try:
        signed_at = calendar.timegm(time.strptime(amz_date, _DATE_FORMAT))
    except ValueError:
        raise SignatureError(
            400,
            "IncompleteSignatureException",
            f"Date must be in ISO-8601 'basic format': {amz_date}",
        ) from None
    now_text = time.strftime(_DATE_FORMAT, time.gmtime(now))
    if signed_at < now - MAX_SKEW:
        earliest = time.strftime(_DATE_FORMAT, time.gmtime(now - MAX_SKEW))
        raise SignatureError(
            403,
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier than {earliest} ({now_text} - 5 min.)",
        )
    if signed_at > now + MAX_SKEW:
        latest = time.strftime(_DATE_FORMAT, time.gmtime(now + MAX_SKEW))
        raise SignatureError(
            403,
            "InvalidSignatureException",
            f"Signature not yet current: {amz_date} is still later than {latest}"
            f" ({now_text} + 5 min.)",
        )


def canonical_request(scope: Scope, body: bytes, signed_headers: tuple[str, ...]) -> str:
    """SigV4's canonical form of the request, over the headers the client signed."""
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
    values: dict[str, list[str]] = {}
    for name, value in scope["headers"]:
        values.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    headers = "".join(
        f"{name}:{','.join(' '.join(value.split()) for value in values.get(name, []))}\n"
        for name in sorted(set(signed_headers))
    )
    payload = values.get("x-amz-content-sha256", [hashlib.sha256(body).hexdigest()])[0]
    return "\n".join(
        (
            scope["method"].upper(),
            quote(_normalize_path(path), safe="/~"),
            _canonical_query(scope.get("query_string", b"").decode("latin-1")),
            headers,
            ";".join(sorted(set(signed_headers))),
            payload,
        )
    )


def _normalize_path(path: str) -> str:
    """RFC 3986's dot-segment removal, empty segments dropped as AWS wants ("/" if empty)."""
    if not path:
        return "/"
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and segments else ""
    return first + "/".join(segments) + last


def _canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = [pair.partition("=") for pair in query.split("&")]
    return "&".join(f"{key}={value}" for key, value in sorted((k, v) for k, _, v in pairs))


def signature(secret: str, date: str, region: str, service: str, to_sign: str) -> str:
    """The hex HMAC of `to_sign` under the key derived from `secret` for the scope."""
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
