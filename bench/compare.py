"""The hot-path cost of a change, side by side in one run, with the method of
bench/observability.py: the proxy at a git revision against the working tree's, or the
working tree's without and with some configuration.

    python bench/compare.py --base main~3                    # 7 rounds of 4 s (about 2 min)
    python bench/compare.py --base v0.1 --quick              # 3 rounds of 2 s
    python bench/compare.py --against 'budget_usd = 1e6'     # the bench key with a budget
    python bench/compare.py --store-key                      # the key in [store] (SQLite)
    python bench/compare.py --pool 4                         # [openai] vs a pool of four
    python bench/compare.py --base main~3 --as-users --floor # as users run it; and the floor
    python bench/compare.py --base main~3 --pad-to 4000000   # 4 MB answers instead of 1.6 KB

The base revision is checked out in a temporary git worktree and run from there (its
`PYTHONPATH` comes first), with this venv's packages. `--against` TOML is appended to the
configuration, right after the bench key's `[[keys]]` entry (so bare keys land in it).
Every proxy has the access log off and sits in front of the same mock; with `--as-users`,
both run as `bench/run.py` runs the proxy (one key with a budget, a pool of two upstreams,
the access log on). `--floor` adds `bench/floor.py`'s bare passthrough as a third row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import load
import procs

ROOT = Path(__file__).resolve().parent.parent
QUIET = "[access_log]\nenabled = false\n"


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """`revision` in a temporary worktree, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="imagegen-base-") as directory:
        tree = Path(directory) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), revision],
            check=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True
            )


Proxy = procs.Proxy


def proxy(args: argparse.Namespace, upstream: str, **options: Any) -> Proxy:
    """The proxy of a row: with the access log off, or with `--as-users` as users run it."""
    if args.as_users:
        return procs.as_users_run_it(upstream, **options)
    return procs.imagegen_proxy(upstream, QUIET, **options)


@contextlib.contextmanager
def pair(args: argparse.Namespace, upstream: str) -> Iterator[list[tuple[str, Proxy]]]:
    """The two proxies to compare, labelled, the baseline first (not started yet)."""
    if args.store_key:
        with tempfile.TemporaryDirectory(prefix="imagegen-store-") as folder:
            store = f"sqlite:///{folder}/s.db"
            yield [
                ("key in [[keys]]", procs.imagegen_proxy(upstream, QUIET)),
                ("key in [store]", procs.imagegen_proxy(upstream, QUIET, store=store)),
            ]
    elif args.pool:
        yield [
            ("one upstream", procs.imagegen_proxy(upstream, QUIET)),
            (f"pool of {args.pool}", procs.imagegen_proxy(upstream, QUIET, pool=args.pool)),
        ]
    elif args.base:
        with checkout(args.base) as tree:
            env = {"PYTHONPATH": str(tree)}
            yield [
                (f"base ({args.base})", proxy(args, upstream, env=env)),
                ("working tree", proxy(args, upstream)),
            ]
    else:
        yield [
            ("without", procs.imagegen_proxy(upstream, QUIET)),
            ("with", procs.imagegen_proxy(upstream, args.against + "\n" + QUIET)),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="git revision to compare the working tree against")
    which.add_argument("--against", help="TOML to compare the working tree with and without")
    which.add_argument(
        "--store-key", action="store_true", help="the bench key in the configuration vs a store"
    )
    which.add_argument(
        "--pool", type=int, metavar="N", help="[openai] vs a pool of N upstreams (the same mock)"
    )
    parser.add_argument(
        "--as-users", action="store_true", help="with --base: the proxies as bench/run.py runs it"
    )
    parser.add_argument("--floor", action="store_true", help="bench/floor.py as a third row")
    parser.add_argument(
        "--pad-to", type=int, default=0, metavar="BYTES", help="the mock's images padded to this"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 3, 2.0
    with contextlib.ExitStack() as stack:
        upstream, _ = stack.enter_context(procs.server(procs.mock(pad_to=args.pad_to)))
        variants = stack.enter_context(pair(args, upstream))
        started = {label: stack.enter_context(server) for label, server in variants}
        if args.floor:
            started["floor"] = stack.enter_context(procs.floor(upstream))
        result = load.side_by_side(started, args.rounds, args.seconds)
    base = variants[0][0]
    table = load.cpu_table(result, base, "proxy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.store_key:
        name, how = "compare-store-key", "--store-key"
    elif args.pool:
        name, how = "compare-pool", f"--pool {args.pool}"
    elif args.base:
        name, how = "compare-base", f"--base {args.base}" + " --as-users" * args.as_users
        how += f" --pad-to {args.pad_to}" * bool(args.pad_to)
    else:
        name, how = "compare-against", f"--against '{args.against}'"
    (out / f"{name}.json").write_text(json.dumps({"settings": vars(args), **result}))
    (out / f"{name}.md").write_text(
        f"`python bench/compare.py {how}` ({args.rounds} rounds of "
        f"{args.seconds:g} s, median)\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
