"""`imagegen-proxy db|projects|keys ...`: the store, from the shell.

For bootstrapping before anything else exists, and for scripts: every command works on the
store of `--config FILE`'s `[store] url`, or of `--store URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, Policy, store_url_of

if TYPE_CHECKING:
    from ..store import KeyRecord, ProjectRecord, Store

COMMANDS = ("db", "projects", "keys", "usage")
_LIMITS = (
    ("requests_per_minute", int),
    ("images_per_minute", int),
    ("max_concurrent", int),
    ("images_per_day", int),
    ("tokens_per_day", int),
    ("budget_usd", float),
)
_UNSETTABLE = ("models", *(name for name, _ in _LIMITS))


def main(argv: Sequence[str]) -> None:
    args = _parser().parse_args(argv)
    try:
        url = _store_url(args)
        policy = _policy(args)
    except ConfigError as exc:
        sys.exit(f"imagegen-proxy: {exc}")
    try:
        from sqlalchemy.exc import SQLAlchemyError

        from ..store import Store, StoreError
    except ImportError:
        sys.exit("imagegen-proxy: the store needs its extra: pip install 'imagegen-proxy[store]'")

    async def run() -> Any:
        store = Store(url)
        try:
            await store.upgrade()
            return await args.action(store, args, policy)
        finally:
            await store.aclose()

    try:
        result = asyncio.run(run())
    except StoreError as exc:
        sys.exit(f"imagegen-proxy: {exc}")
    except OSError as exc:
        sys.exit(f"imagegen-proxy: cannot reach the store: {exc}")
    except SQLAlchemyError as exc:  # a file it cannot open, a server that refuses, ...
        sys.exit(f"imagegen-proxy: cannot use the store: {getattr(exc, 'orig', None) or exc}")
    if result is not None:
        print(json.dumps(result, indent=2) if args.json else _table(result))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen-proxy", description=__doc__)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--config", metavar="FILE", help="TOML configuration with a [store] url")
    where.add_argument("--store", metavar="URL", help="sqlite:///PATH or postgresql://...")
    where.add_argument("--json", action="store_true", help="print JSON")
    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument("--models", help="allow-list, comma-separated")
    for name, kind in _LIMITS:
        limits.add_argument("--" + name.replace("_", "-"), type=kind)
    limits.add_argument("--budget-period", choices=["day", "week", "month", "total"])
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="the schema").add_subparsers(dest="verb", required=True)
    db.add_parser("upgrade", parents=[where], help="migrate to the newest schema").set_defaults(
        action=_upgraded
    )

    projects = commands.add_parser("projects", help="groups of keys sharing limits and a budget")
    verbs = projects.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", parents=[where, limits], help="a new project")
    create.add_argument("name")
    create.set_defaults(action=_create_project)
    verbs.add_parser("list", parents=[where]).set_defaults(action=_list_projects)
    update = verbs.add_parser(
        "update", parents=[where, limits], help="change its name or limits (its budget, ...)"
    )
    update.add_argument("ref", metavar="ID_OR_NAME")
    update.add_argument("--name", dest="new_name", metavar="NAME", help="rename it")
    update.add_argument(
        "--unset",
        type=_fields,
        default=[],
        metavar="FIELDS",
        help="comma-separated limits to remove (unlimited after): " + ", ".join(_UNSETTABLE),
    )
    update.set_defaults(action=_update_project)
    archive = verbs.add_parser("archive", parents=[where], help="its keys stop working")
    archive.add_argument("ref", metavar="ID_OR_NAME")
    archive.set_defaults(action=_archive_project)

    keys = commands.add_parser("keys", help="client keys")
    verbs = keys.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", parents=[where, limits], help="a new key, shown once")
    create.add_argument("name")
    create.add_argument("--project", metavar="ID_OR_NAME")
    create.add_argument("--expires-in", type=float, metavar="SECONDS")
    create.add_argument(
        "--import-env",
        metavar="VARIABLE",
        help="store the existing key held in this variable (a key never goes on a command line)",
    )
    create.set_defaults(action=_create_key)
    verbs.add_parser("list", parents=[where]).set_defaults(action=_list_keys)
    for verb, action, text in (
        ("revoke", _revoke_key, "it stops working"),
        ("rotate", _rotate_key, "a new secret, shown once; the old one stops working"),
    ):
        parser_ = verbs.add_parser(verb, parents=[where], help=text)
        parser_.add_argument("ref", metavar="ID_OR_NAME")
        parser_.set_defaults(action=action)

    usage = commands.add_parser(
        "usage", parents=[where], help="what was spent, from the ledger: CSV or JSON rows"
    )
    usage.add_argument("--since", required=True, type=_moment, metavar="DATE")
    usage.add_argument("--until", type=_moment, metavar="DATE", help="exclusive; default: now")
    usage.add_argument(
        "--group-by",
        type=_usage_groups,
        default=[],
        metavar="FIELDS",
        help="comma-separated: " + ", ".join(_USAGE_GROUPS),
    )
    usage.add_argument(
        "--bucket", choices=["1m", "1h", "1d"], help="a row per (UTC) bucket, not per range"
    )
    usage.add_argument("--format", choices=["csv", "json"], default="csv")
    usage.set_defaults(action=_usage)
    return parser


def _store_url(args: argparse.Namespace) -> str:
    if args.store:
        return str(args.store)
    if not args.config:
        raise ConfigError("name the store: --store URL, or --config FILE with a [store] url")
    url = store_url_of(args.config)
    if url is None:
        raise ConfigError(f"{args.config}: no [store] url")
    return url


def _policy(args: argparse.Namespace) -> Policy:
    given: dict[str, Any] = {
        name: getattr(args, name, None)
        for name, _ in _LIMITS
        if getattr(args, name, None) is not None
    }
    if getattr(args, "models", None):
        given["models"] = frozenset(part.strip() for part in args.models.split(","))
    if getattr(args, "budget_period", None):
        given["budget_period"] = args.budget_period
    try:
        return Policy.model_validate(given)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def _upgraded(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    return {"status": "the store has the newest schema (migrated if it had an older one)"}


async def _create_project(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    return _project(await store.create_project(args.name, policy))


async def _list_projects(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    return [_project(project) for project in await store.projects()]


async def _update_project(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    """Only what the command line names changes: the limits given, and those unset."""
    from ..store import StoreError
    from ..store.admin import Admin

    limits: dict[str, Any] = dict.fromkeys(args.unset)
    limits.update(policy.model_dump(exclude_unset=True))
    if both := sorted(set(args.unset) & set(policy.model_fields_set)):
        raise StoreError(f"both set and unset: {', '.join(both)}")
    if not limits and args.new_name is None:
        raise StoreError("nothing to change: give a limit, --unset or --name")
    project = await store.project(args.ref)
    return _project(
        await Admin(store).modify_project(project.id, name=args.new_name, limits=limits)
    )


async def _archive_project(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    return _project(await store.archive_project(args.ref))


async def _create_key(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    from ..store import StoreError

    existing = None
    if args.import_env:
        existing = os.environ.get(args.import_env)
        if not existing:
            raise StoreError(f"environment variable {args.import_env} is not set")
    record, secret = await store.create_key(
        args.name,
        project=args.project,
        policy=policy,
        expires_in=args.expires_in,
        secret=existing,
    )
    return {**_key(record), "key": secret}


async def _list_keys(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    return [_key(key) for key in await store.keys()]


async def _revoke_key(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    return _key(await store.revoke_key(args.ref))


async def _rotate_key(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    record, secret = await store.rotate_key(args.ref)
    return {**_key(record), "key": secret}


_USAGE_GROUPS = {
    "project": ("project_id", "project_name"),
    "key": ("api_key_id", "key_name"),
    "model": ("model",),
    "size": ("size",),
    "quality": ("quality",),
    "source": ("source",),
}


async def _usage(store: Store, args: argparse.Namespace, policy: Policy) -> Any:
    """One row per group (and bucket, with --bucket); CSV or JSON on stdout."""
    from ..governance.pricing import usd
    from ..store import StoreError
    from ..store.ledger import WIDTHS, usage_lines

    until = int(time.time()) if args.until is None else args.until
    if until <= args.since:
        raise StoreError("--until must be after --since")
    groups = [field for group in args.group_by for field in _USAGE_GROUPS[group]]
    width = WIDTHS[args.bucket] if args.bucket else None
    lines = await usage_lines(store, args.since, until, width=width, group_by=groups)
    as_json = args.json or args.format == "json"
    rows = [
        {
            **({"start": _iso(line.start)} if args.bucket else {}),
            **line.group,
            "requests": line.requests,
            "images": line.images,
            "input_tokens": line.input_tokens,
            "output_tokens": line.output_tokens,
            "cost_usd": line.cost_micros / 1_000_000 if as_json else usd(line.cost_micros),
        }
        for line in lines
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return None
    columns = ["start"] if args.bucket else []
    columns += [*groups, "requests", "images", "input_tokens", "output_tokens", "cost_usd"]
    output = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
    output.writeheader()
    output.writerows(rows)
    return None


def _moment(text: str) -> int:
    """Unix seconds, or an ISO date or time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (2026-11-01, ...)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _fields(text: str) -> list[str]:
    fields = [part.strip().replace("-", "_") for part in text.split(",") if part.strip()]
    if unknown := [field for field in fields if field not in _UNSETTABLE]:
        raise argparse.ArgumentTypeError(f"cannot unset {', '.join(unknown)}")
    return fields


def _usage_groups(text: str) -> list[str]:
    groups = [part.strip() for part in text.split(",") if part.strip()]
    if unknown := [group for group in groups if group not in _USAGE_GROUPS]:
        raise argparse.ArgumentTypeError(f"cannot group by {', '.join(unknown)}")
    return groups


def _iso(moment: int) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _limits(policy: Policy) -> dict[str, Any]:
    return policy.model_dump(mode="json", exclude_unset=True)


def _project(project: ProjectRecord) -> dict[str, Any]:
    return {
        "id": project.id,
        "name": project.name,
        "status": "archived" if project.archived_at is not None else "active",
        "created_at": project.created_at,
        "limits": _limits(project.policy),
    }


def _key(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "project_id": key.project_id,
        "redacted": key.redacted,
        "status": key.state(time.time()),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "limits": _limits(key.policy),
    }


def _table(result: Any) -> str:
    """One line per record, `field: value`, records apart by a blank line."""
    rows = result if isinstance(result, list) else [result]
    if not rows:
        return "(none)"
    return "\n\n".join(
        "\n".join(f"{name}: {_text(value, name)}" for name, value in row.items()) for row in rows
    )


def _text(value: Any, name: str = "") -> str:
    if name.endswith("_at") and isinstance(value, int):  # Unix seconds, as --json keeps them
        return _iso(value)
    if isinstance(value, dict):
        return ", ".join(f"{name}={_text(item)}" for name, item in value.items())
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return "" if value is None else str(value)
