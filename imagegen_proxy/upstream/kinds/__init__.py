"""The kinds of upstream, one module each behind `base.Kind`: what each does its own way
(where a request goes, how the credential travels, which operations it serves). Adding a
kind is one module here, its entry in `KINDS`, its `[[upstreams]]` model in `config`, and
its prices."""

from __future__ import annotations

from ...config import AzureMember, OpenAIMember
from .azure import Azure
from .base import Kind, Located
from .openai import OpenAI


def kind_of(member: OpenAIMember | AzureMember) -> Kind:
    """The kind of upstream `member` configures."""
    if isinstance(member, AzureMember):
        return Azure(member)
    return OpenAI(member)


__all__ = ["Kind", "Located", "kind_of"]
