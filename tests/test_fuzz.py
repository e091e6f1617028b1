"""Property-based fuzzing of the proxy over real sockets: bodies, headers, paths, queries,
and the multipart uploads of edits and variations.

Whatever arrives, the answer is a success or an OpenAI-shaped error, never a 500. The quick
profiles run in CI; `pytest -m long tests/test_fuzz.py` runs 10,000 requests of each kind.
"""

from __future__ import annotations

import json
import socket
import string
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import h11
import httpx
import pytest
from conftest import API_VERSION, CLIENT_KEY, UPSTREAM_KEY, HostApp, proxy_config
from double import Exchange, Recorded, UpstreamDouble, image_body, multipart_parts
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from python_multipart.multipart import parse_options_header
from support import serve

from imagegen_proxy import ImageGenProxy
from imagegen_proxy.wire.routing import OPENAI_PATHS
from imagegen_proxy.wire.upload import DECIDING, FILE_FIELDS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text() | json_values,
        "n": st.integers(-5, 20) | json_values,
        "stream": st.booleans() | json_values,
        "partial_images": st.integers(-2, 6) | json_values,
        "output_compression": st.integers(-10, 120) | json_values,
        "size": st.text(max_size=12) | json_values,
        "model": st.text(max_size=20) | json_values,
    },
)
bodies = st.one_of(
    st.builds(
        lambda d, extra: json.dumps({**extra, **d}).encode(),
        fields,
        st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    ),
    st.binary(max_size=300),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 3000).map(lambda depth: b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"),
)
hostile = st.lists(
    st.characters(codec="utf-8") | st.sampled_from(["\r\n", "\x00", "/", "..", "%", "?", "#"]),
    max_size=12,
).map("".join)
paths = st.one_of(
    st.sampled_from(
        [
            "/v1/images/generations",
            "/images/generations",
            "/openai/v1/images/generations",
            "/openai/images/generations",
        ]
    ),
    hostile.map(lambda dep: f"/openai/deployments/{quote(dep, safe='')}/images/generations"),
    hostile.map(lambda rest: "/v1/images/" + quote(rest, safe="/")),
)
queries = st.dictionaries(
    st.sampled_from(["api-version", "x", "api-version "]), hostile, max_size=2
)
# Visible ASCII, no surrounding blanks: what an HTTP client can send at all.
header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "authorization": st.sampled_from([f"Bearer {CLIENT_KEY}", "Basic !!", "Bearer", ""])
        | header_value,
        "api-key": st.just(CLIENT_KEY) | header_value,
        "x-virtual-key": header_value,
        "content-type": st.sampled_from(["application/json", "text/plain", "application/x+json"])
        | header_value,
        "x-forwarded-for": header_value,
    },
)
methods = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    upstream = UpstreamDouble()
    with serve(upstream) as upstream_url:
        upstream.url = upstream_url
        keys = [{"name": "fuzz", "key": CLIENT_KEY, "requests_per_minute": 10**9}]
        config = proxy_config(
            upstream, azure=True, auth={"open": False}, keys=keys, proxy={"max_body_bytes": 4096}
        )
        with serve(ImageGenProxy(HostApp().app, config)) as url:
            yield url


def check(
    url: str, method: str, path: str, query: dict[str, str], head: dict[str, str], body: bytes
) -> None:
    answer = httpx.request(method, url + path, params=query, headers=head, content=body, timeout=30)
    assert answer.status_code < 500, answer.text[:300]
    if answer.status_code >= 400 and answer.headers.get("content-type") == "application/json":
        error: Any = answer.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}


def fuzz(url: str, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(methods, paths, queries, headers, bodies)
    def run(
        method: str, path: str, query: dict[str, str], head: dict[str, str], body: bytes
    ) -> None:
        check(url, method, path, query, head, body)

    run()


def test_fuzzed_requests_get_a_success_or_an_openai_error(target: str) -> None:
    fuzz(target, examples=300)


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_fuzzed_requests_long(target: str) -> None:
    fuzz(target, examples=10_000)


# --- multipart uploads: image edits and variations ---------------------------------------
#
# Bodies written by hand, part by part: text fields before and after the files, valid and
# invalid values, odd part headers and boundaries, cut short, sent over a raw socket in
# random pieces (with Content-Length or chunked). Besides the answer, what the upstream got
# is checked: a whole multipart body carrying every file part as the client sent it, and
# none of the client's credentials.

T = TypeVar("T")
FORM_PATHS = [path for path in OPENAI_PATHS if not path.endswith("/generations")]
AZURE_EDITS = "/openai/deployments/{}/images/edits?api-version={}"
# What a conforming client escapes in a part's name or filename (WHATWG, as httpx does);
# the proxy writes the names it relays the same way.
WHATWG = str.maketrans({'"': "%22", "\r": "%0D", "\n": "%0A"})
# RFC 2046's boundary characters (a space too, but not last: see the odd boundaries).
BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"
TOKEN = set(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
KNOWN_FIELDS = [
    *sorted(FILE_FIELDS),
    *sorted(DECIDING),
    "output_compression",
    "response_format",
    "background",
    "input_fidelity",
    "markup",
    "svg[model]",
]
UPSTREAM_ANSWER = image_body("aW1hZ2U=")


@dataclass(frozen=True)
class FormPart:
    """One part as written: its header lines, its content, and what a conforming client
    would mean by them (`clean`: headers quoted as a careful client quotes them)."""

    head: bytes
    content: bytes
    name: str
    filename: str | None
    clean: bool


@dataclass(frozen=True)
class FormRequest:
    path: str
    headers: list[tuple[str, str]]
    content_type: str
    body: bytes  # the whole body as written
    sent: bytes  # what goes on the wire: the body, or the start of it
    complete: bool  # the HTTP message ends (else the client stops sending and half-closes)
    chunked: bool
    pieces: list[bytes]  # `sent`, in the writes it goes in
    pauses: list[bool]  # a short wait after each piece, so the proxy reads it alone
    parts: list[FormPart]
    clean: bool  # a conforming client's whole body: the parts it means are `parts`


def param(text: str) -> str:
    """A name or filename as a conforming client quotes it (the backslash doubled, so no
    parser can read it as escaping the closing quote)."""
    return text.replace("\\", "\\\\").translate(WHATWG)


def mostly(
    usual: st.SearchStrategy[T], odd: st.SearchStrategy[T], one_in: int
) -> st.SearchStrategy[T]:
    """`usual`, and `odd` about once in `one_in` draws (shrinking towards `usual`)."""
    rolls = st.sampled_from([False] * (one_in - 1) + [True])
    return rolls.flatmap(lambda is_odd: odd if is_odd else usual)


# Each deciding field's values: valid ones, then invalid ones.
FIELD_VALUES = {
    "n": (["1", "2", "10"], ["0", "11", "-1", "1.5", "two", ""]),
    "partial_images": (["0", "1", "3"], ["4", "-1", "x"]),
    "stream": (["true", "false"], ["maybe", "", "2"]),
    "prompt": (["a cat in a hat", "é 🖼\r\nline two"], [""]),
    "model": (["gpt-image-1", "dall-e-2"], []),
    "size": (["1024x1024", "auto", "2048x1152"], []),
    "quality": (["high", "xhigh"], []),
    "output_compression": (["0", "50", "100"], ["101", "-1", "x"]),
}


def text_values(name: str) -> st.SearchStrategy[bytes]:
    valid, invalid = FIELD_VALUES.get(name, ([], []))
    usual = st.sampled_from(valid) if valid else st.text(max_size=30)
    odd = st.sampled_from([*invalid, "\x00"]) | st.text(max_size=30)
    return mostly(mostly(usual, odd, 6).map(str.encode), st.binary(max_size=20), 12)


odd_names = st.text(max_size=10).map(lambda text: "x-" + text)
filenames = st.one_of(
    st.sampled_from(["cat.png", "", "image.webp", "C:\\Users\\me\\cat.png", "a;b.png"]),
    st.text(max_size=12),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "image/png",
            "application/octet-stream",
            "",
            "image/png; charset=utf-8",
            "multipart/form-data; boundary=inner",
            "image/ü",
            "x/" + "y" * 300,
        ]
    ),
)


@st.composite
def contents(draw: st.DrawFn, boundary: bytes) -> bytes:
    """Bytes with near misses of the delimiter in them (never the whole delimiter)."""
    near = [b"\r\n", b"\r\n--", b"--", b"\r", b"\n--" + boundary]
    near += [b"\r\n--" + boundary[:cut] for cut in range(len(boundary))]
    pieces = draw(st.lists(st.binary(max_size=300) | st.sampled_from(near), max_size=6))
    # Now and then a file past the proxy's upload limit.
    pieces += draw(mostly(st.just([]), st.integers(1000, 1600).map(lambda n: [b"PNG!" * n]), 20))
    return b"".join(pieces)


@st.composite
def form_parts(draw: st.DrawFn, boundary: bytes, name: str | None = None) -> FormPart:
    if name is None:
        name = draw(mostly(st.sampled_from(KNOWN_FIELDS), odd_names, 4))
    if name in FILE_FIELDS:  # mostly with a filename, as the SDK sends them
        file_like = not draw(mostly(st.just(False), st.just(True), 6))
    else:
        file_like = draw(mostly(st.just(False), st.just(True), 12))
    filename = draw(filenames) if file_like else None
    is_file = file_like or name in FILE_FIELDS
    content = draw(contents(boundary)) if is_file else draw(text_values(name))
    odd_kinds = st.sampled_from(["odd-name", "odd-filename", "no-name", "extra"])
    kind = draw(mostly(st.just("clean"), odd_kinds, 12))
    disposition = f'form-data; name="{param(name)}"'
    if filename is not None:
        disposition += f'; filename="{param(filename)}"'
    lines = [f"Content-Disposition: {disposition}"]
    if kind == "odd-name":  # unquoted, quotes and line breaks left raw, lower case
        lines[0] = f"content-disposition: form-data; name={name}"
        if filename is not None:
            lines[0] += f'; filename="{filename}"'
    elif kind == "odd-filename":
        odd = draw(st.sampled_from(['a"b.png', 'a\\"b', "a\r\nb", "a\nb", "a\rb", "é\r\n\r\nx"]))
        lines[0] = f'Content-Disposition: form-data; name="{param(name)}"; filename="{odd}"'
    elif kind == "no-name":
        lines = [
            draw(
                st.sampled_from(
                    [
                        "Content-Disposition: form-data",
                        'Content-Disposition: form-data; filename="a.png"',
                        'Content-Disposition: attachment; name="image"',
                        'Content-Disposition: form-data; name=""',
                        "Content-Type: image/png",
                    ]
                )
            )
        ]
    elif kind == "extra":
        lines += draw(
            st.lists(
                st.sampled_from(
                    [
                        "Content-Transfer-Encoding: base64",
                        "X-Custom: value",
                        "X-Empty:",
                        "no colon here",
                        ": no name",
                        "X-Long: " + "v" * 2000,
                        "X-Unicode: ünï 🖼",
                    ]
                ),
                min_size=1,
                max_size=3,
            )
        )
    content_type = draw(content_types)
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    head = "\r\n".join(lines).encode()
    # The one thing a client cannot send inside a part: its delimiter.
    assume(b"\r\n--" + boundary not in head + b"\r\n\r\n" + content)
    return FormPart(head, content, name, filename, clean=kind == "clean")


@st.composite
def form_requests(draw: st.DrawFn) -> FormRequest:
    odd_azure = st.builds(
        AZURE_EDITS.format,
        st.sampled_from(["a..b", "-x", "%2Fx", "%C3%A9"]),
        st.sampled_from([API_VERSION, "bad%20version", "", "x" * 40]),
    )
    path = draw(
        mostly(st.sampled_from([*FORM_PATHS, AZURE_EDITS.format("dep-1", "v1")]), odd_azure, 8)
    )
    odd_boundaries = st.sampled_from(
        ["a b", "é", "-" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW"]
    )
    written = draw(
        mostly(
            st.text(BCHARS, min_size=1, max_size=70),
            odd_boundaries | st.text(BCHARS, min_size=71, max_size=90),
            8,
        )
    )
    boundary = written.encode()
    style = draw(
        mostly(
            st.sampled_from(["token", "quoted"]),
            st.sampled_from(["missing", "empty", "mismatch"]),
            8,
        )
    )
    odd_media = st.sampled_from(
        ["Multipart/Form-Data", "image/png", "multipart/mixed", "text/plain"]
    )
    media = draw(mostly(st.just("multipart/form-data"), odd_media, 10))
    if style == "token" and set(written) <= TOKEN:
        content_type = f"{media}; boundary={written}"
    elif style in ("token", "quoted"):
        content_type = f'{media}; boundary="{written}"'
    elif style == "missing":
        content_type = media
    elif style == "empty":
        content_type = f"{media}; boundary="
    else:
        content_type = f"{media}; boundary={written}x"
    parts = draw(st.lists(form_parts(boundary), max_size=5))
    # Mostly a prompt and an image, anywhere among the rest.
    for needed in ("prompt", "image"):
        if draw(st.integers(0, 4)) < 4:
            at = draw(st.integers(0, len(parts)))
            parts.insert(at, draw(form_parts(boundary, needed)))
    preamble = draw(st.sampled_from([b""] * 6 + [b"\r\n", b"preamble\r\n"]))
    epilogue = draw(st.sampled_from([b"\r\n"] * 6 + [b"", b"\r\nepilogue"]))
    body = preamble
    for part in parts:
        body += b"--" + boundary + b"\r\n" + part.head + b"\r\n\r\n" + part.content + b"\r\n"
    body += b"--" + boundary + b"--" + epilogue
    cut = draw(mostly(st.none(), st.integers(0, max(len(body) - 1, 0)), 6))
    sent = body if cut is None else body[:cut]
    complete = cut is None or draw(st.booleans())
    cuts = sorted(set(draw(st.lists(st.integers(0, len(sent)), max_size=8))))
    pieces = [sent[a:b] for a, b in zip([0, *cuts], [*cuts, len(sent)], strict=True)]
    pauses = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    chunked = draw(st.booleans())
    headers = [("content-type", content_type)]
    if not chunked:
        # A client that stops early announced the whole body.
        headers.append(("content-length", str(len(sent) if complete else len(body))))
    Auth = list[tuple[str, str]]
    credentials: list[Auth] = [
        [("authorization", f"Bearer {CLIENT_KEY}")],
        [("api-key", CLIENT_KEY)],
    ]
    strangers: list[Auth] = [
        [("authorization", "Bearer sk-wrong")],
        [("x-api-key", "sk-wrong")],
        [],
    ]
    headers += draw(mostly(st.sampled_from(credentials), st.sampled_from(strangers), 10))
    clean = (
        style in ("token", "quoted")
        and media.lower() == "multipart/form-data"
        and all(part.clean for part in parts)
        and cut is None
    )
    return FormRequest(
        path,
        headers,
        content_type,
        body,
        sent,
        complete,
        chunked,
        pieces,
        pauses,
        parts,
        clean,
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send_form(url: str, request: FormRequest, request_id: str) -> Answer | None:
    """Send `request` over a new connection as it says; its answer, or None when the proxy
    closed the connection without one."""
    host, port = url.removeprefix("http://").split(":")
    client = h11.Connection(h11.CLIENT)
    headers = [
        ("host", "fuzz"),
        ("connection", "close"),
        ("x-client-request-id", request_id),
        *request.headers,
    ]
    if request.chunked:
        headers.append(("transfer-encoding", "chunked"))
    raw = [(name.encode(), value.encode()) for name, value in headers]  # UTF-8 values too
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.sendall(client.send(h11.Request(method="POST", target=request.path, headers=raw)))
            for piece, pause in zip(request.pieces, request.pauses, strict=True):
                sock.sendall(client.send(h11.Data(data=piece)) or b"")
                if pause:
                    time.sleep(0.001)
            if request.complete:
                sock.sendall(client.send(h11.EndOfMessage()) or b"")
            else:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy answered before it read everything, and closed
        return read_answer(client, sock)


def read_answer(client: h11.Connection, sock: socket.socket) -> Answer | None:
    """The answer on `sock`; None if the connection closed before one began."""
    answer: Answer | None = None
    while True:
        try:
            received = client.next_event()
        except h11.RemoteProtocolError:
            assert answer is None, "the answer was cut short"
            return None
        if received is h11.NEED_DATA:
            try:
                client.receive_data(sock.recv(65536))
            except ConnectionResetError:
                client.receive_data(b"")
            except TimeoutError:
                raise AssertionError("the proxy neither answered nor closed") from None
        elif isinstance(received, h11.Response):
            fields = {k.decode(): v.decode("latin-1") for k, v in received.headers}
            answer = Answer(received.status_code, fields, b"")
        elif isinstance(received, h11.Data):
            assert answer is not None
            answer.body += received.data
        elif isinstance(received, h11.EndOfMessage | h11.ConnectionClosed):
            return answer


Parts = list[tuple[str, str | None, bytes]]


def as_relayed(parts: Parts) -> Parts:
    """Parts with their names as the proxy writes them: quotes and line breaks escaped, and
    without the vertical tabs and form feeds it strips off the ends of a part's header
    (python-multipart strips only spaces and tabs: a name left unquoted keeps them)."""
    return [(name.strip("\x0b\x0c").translate(WHATWG), file, data) for name, file, data in parts]


def file_parts(parts: Parts) -> list[tuple[str, bool, bytes]]:
    return [
        (name, filename is not None, content)
        for name, filename, content in as_relayed(parts)
        if filename is not None or name in FILE_FIELDS
    ]


def text_parts(parts: Parts) -> list[tuple[str, bytes]]:
    return sorted(
        (name, content)
        for name, filename, content in as_relayed(parts)
        if filename is None and name not in FILE_FIELDS
    )


def check_relayed(request: FormRequest, got: Recorded) -> None:
    """What the upstream got for `request`: a whole multipart body, every part as sent
    (the text fields may come first), and none of the client's credentials."""
    assert CLIENT_KEY not in str(got.headers)
    assert CLIENT_KEY.encode() not in got.body
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}" or (
        got.header("api-key") == UPSTREAM_KEY
    )
    content_type = got.header("content-type") or ""
    _, options = parse_options_header(content_type)
    assert got.body.endswith(b"--" + options[b"boundary"] + b"--\r\n")
    relayed = multipart_parts(got.body, content_type)
    # What a multipart parser reads in what the client sent...
    # (The Content-Type went as UTF-8; servers read header bytes as latin-1.)
    sent = multipart_parts(request.sent, request.content_type.encode().decode("latin-1"))
    assert file_parts(relayed) == file_parts(sent)
    assert text_parts(relayed) == text_parts(sent)
    if request.clean:
        # ... and what the client meant.
        meant = [(part.name, part.filename, part.content) for part in request.parts]
        assert file_parts(relayed) == file_parts(meant)


@pytest.fixture(scope="module")
def form_target() -> Iterator[tuple[str, UpstreamDouble]]:
    async def answer(x: Exchange) -> None:
        headers = [("content-type", "application/json")]
        await x.start(200, [*headers, ("content-length", str(len(UPSTREAM_ANSWER)))])
        await x.body(UPSTREAM_ANSWER, more=False)

    upstream = UpstreamDouble(answer=answer)
    with serve(upstream) as upstream_url:
        upstream.url = upstream_url
        keys = [{"name": "fuzz", "key": CLIENT_KEY, "requests_per_minute": 10**9}]
        limits = {"max_upload_bytes": 4096, "max_upload_files": 3, "body_timeout": 5}
        config = proxy_config(upstream, azure=True, auth={"open": False}, keys=keys, proxy=limits)
        with serve(ImageGenProxy(HostApp().app, config)) as url:
            yield url, upstream


def fuzz_forms(url: str, upstream: UpstreamDouble, examples: int) -> None:
    sent: dict[str, FormRequest] = {}

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(form_requests())
    def run(request: FormRequest) -> None:
        request_id = f"fuzz-{uuid.uuid4().hex}"
        sent[request_id] = request
        answer = send_form(url, request, request_id)
        if answer is None:
            assert not request.complete, "a whole request got no answer"
            event("no answer")
        else:
            assert answer.status < 500, answer.body[:300]
            assert answer.headers.get("x-request-id")
            if answer.status >= 300:
                assert answer.headers.get("content-type") == "application/json", answer
                error: Any = json.loads(answer.body)["error"]
                assert set(error) >= {"message", "type", "param", "code"}
                event(f"{answer.status} {error['code']}")
            else:
                assert answer.body == UPSTREAM_ANSWER
                event(f"{answer.status} relayed" + (" (clean)" if request.clean else ""))
        relayed = [
            got for got in upstream.requests if got.header("x-client-request-id") == request_id
        ]
        if answer is not None and answer.status < 300:
            assert len(relayed) == 1
        for got in relayed:
            check_relayed(request, got)

    run()
    # A request the upstream got after its client's answer was checked is checked here.
    for got in upstream.requests:
        request = sent.get(got.header("x-client-request-id") or "")
        if request is not None:  # (not one of another test's)
            check_relayed(request, got)


def test_fuzzed_uploads_get_a_success_or_an_openai_error(
    form_target: tuple[str, UpstreamDouble],
) -> None:
    fuzz_forms(*form_target, examples=300)


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_fuzzed_uploads_long(form_target: tuple[str, UpstreamDouble]) -> None:
    fuzz_forms(*form_target, examples=10_000)
