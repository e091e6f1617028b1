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
from .stability import Stability

# Each kind by its `kind = "..."`, made from its member's settings.
KINDS: dict[str, Callable[[Any], Kind]] = {
    "openai": OpenAI,
    "azure": Azure,
    "gemini": Gemini,
    "stability": Stability,
    "bedrock": Bedrock,
    "bfl": Bfl,
}


def kind_of(member: Member) -> Kind:
    """The kind of upstream `member` configures."""
    return KINDS[member.kind](member)


__all__ = ["KINDS", "Job", "Kind", "Located", "Translating", "kind_of"]
