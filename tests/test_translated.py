"""The pieces of a translated answer: base64 as raw bytes arrive, and an image's format and
size read from its first bytes."""

from __future__ import annotations

import base64
import itertools
import os
import struct

from hypothesis import given
from hypothesis import strategies as st

from imagegen_proxy.mock.png import render_png
from imagegen_proxy.upstream.translated import Base64Pieces, Sniffed, image_info


@given(st.binary(max_size=120_000), st.lists(st.integers(0, 120_000), max_size=8))
def test_base64_pieces_are_the_base64_of_the_whole(data: bytes, cuts: list[int]) -> None:
    encoder = Base64Pieces()
    assert all(len(piece) <= Base64Pieces.PIECE * 4 // 3 for piece in Base64Pieces().feed(data))
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    out = b"".join(b"".join(encoder.feed(data[a:b])) for a, b in itertools.pairwise(points))
    assert out + encoder.end() == base64.b64encode(data)


def test_a_png_is_read_from_its_header() -> None:
    assert image_info(render_png("p", width=321, height=123)) == ("png", (321, 123))


def test_a_jpeg_is_read_from_its_frame_header() -> None:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof = b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 480, 640) + b"\x03" + b"\x00" * 9
    assert image_info(b"\xff\xd8" + app0 + sof + b"\xff\xda") == ("jpeg", (640, 480))


def test_webp_sizes_are_read() -> None:
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x00" * 8 + (799).to_bytes(3, "little")
    vp8x += (599).to_bytes(3, "little")
    assert image_info(vp8x) == ("webp", (800, 600))
    bits = (1023) | (767 << 14)
    vp8l = b"RIFF\x00\x00\x00\x00WEBPVP8L" + b"\x00" * 4 + b"\x2f" + bits.to_bytes(4, "little")
    assert image_info(vp8l) == ("webp", (1024, 768))


def test_something_else_is_unknown() -> None:
    assert image_info(os.urandom(64).replace(b"\x89", b"\x00")) in ((None, None), ("jpeg", None))
    sniffed = Sniffed()
    sniffed.feed(b"not base64!!")
    sniffed.read()
    assert (sniffed.format, sniffed.size) == (None, None)


def test_sniffing_keeps_a_bounded_head() -> None:
    sniffed = Sniffed()
    data = base64.b64encode(render_png("p", width=64, height=32, pad_to=2_000_000))
    for at in range(0, len(data), 65536):
        sniffed.feed(data[at : at + 65536])
    sniffed.read()
    assert (sniffed.format, sniffed.size) == ("png", "64x32")
