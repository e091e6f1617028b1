"""The hot-path cost of a change, side by side in one run, with the method of
bench/observability.py: the proxy at a git revision against the working tree's, or the
working tree's without and with some configuration.

    python bench/compare.py --base main~3                    # 7 rounds of 4 s (about 2 min)
    python bench/compare.py --base v0.1 --quick              # 3 rounds of 2 s
    python bench/compare.py --against 'budget_usd = 1e6'     # the bench key with a budget

The base revision is checked out in a temporary git worktree and run from there (its
`PYTHONPATH` comes first), with this venv's packages. `--against` TOML is appended to the
configuration, right after the bench key's `[[keys]]` entry (so bare keys land in it).
Every proxy has the access log off, as `bench/run.py` does, and sits in front of the same
mock.
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="git revision to compare the working tree against")
    which.add_argument("--against", help="TOML to compare the working tree with and without")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 3, 2.0
    with contextlib.ExitStack() as stack:
        upstream, _ = stack.enter_context(procs.server(procs.mock()))
        if args.base:
            tree = stack.enter_context(checkout(args.base))
            base = f"base ({args.base})"
            env = {"PYTHONPATH": str(tree)}
            other, changed = procs.imagegen_proxy(upstream, QUIET, env=env), QUIET
        else:
            base = "without"
            other, changed = procs.imagegen_proxy(upstream, QUIET), args.against + "\n" + QUIET
        started = {
            base: stack.enter_context(other),
            "with" if args.against else "working tree": stack.enter_context(
                procs.imagegen_proxy(upstream, changed)
            ),
        }
        result = load.side_by_side(started, args.rounds, args.seconds)
    table = load.cpu_table(result, base, "proxy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "compare-base" if args.base else "compare-against"
    (out / f"{name}.json").write_text(json.dumps({"settings": vars(args), **result}))
    how = f"--base {args.base}" if args.base else f"--against '{args.against}'"
    (out / f"{name}.md").write_text(
        f"`python bench/compare.py {how}` ({args.rounds} rounds of "
        f"{args.seconds:g} s, median)\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
