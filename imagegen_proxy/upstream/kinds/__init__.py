"""The kinds of upstream, one module each behind `base.Kind`: what each does its own way
(where a request goes, how the credential travels, which operations it serves). Adding a
kind is one module here, its entry in `KINDS`, its `[[upstreams]]` model in `config`, and
its prices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...config import Member
from .azure import Azure
from .base import Job, Kind, Located, Translating
from .bedrock import Bedrock
from .bfl import Bfl
from .gemini import Gemini
from .openai import OpenAI
from .stability import SERVICES, Stability

# Each kind by its `kind = "..."`, made from its member's settings.
KINDS: dict[str, Callable[[Any], Kind]] = {
    "openai": OpenAI,
    "azure": Azure,
    "gemini": Gemini,
    "stability": Stability,
    "bedrock": Bedrock,
    "bfl": Bfl,
}


# Which kind a priced model is made by, told by its name: an upstream that names no
# `models` serves (and `/v1/models` lists) the priced models of its own kind only.
_MAKERS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("gemini", lambda model: model.startswith("gemini-")),
    ("bfl", lambda model: model.startswith("flux")),
    ("stability", lambda model: model in SERVICES or model.startswith(("sd3-", "sd3.5-"))),
    ("bedrock", lambda model: model.startswith("amazon.")),
)


def kind_of(member: Member) -> Kind:
    """The kind of upstream `member` configures."""
    return KINDS[member.kind](member)


def makes(kind: str, model: str) -> bool:
    """Whether an upstream of `kind` makes the priced `model` (OpenAI's API, on OpenAI or
    Azure, every model no other kind makes)."""
    maker = next((name for name, made in _MAKERS if made(model)), "openai")
    return kind == maker or (maker == "openai" and kind == "azure")


__all__ = ["KINDS", "Job", "Kind", "Located", "Translating", "kind_of", "makes"]
