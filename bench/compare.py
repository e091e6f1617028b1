"""The hot-path cost of a change: the proxy at a git revision and the working tree's, side by
side in one run, with the method of bench/observability.py.

    python bench/compare.py --base main~3            # 7 rounds of 4 s (about 2 minutes)
    python bench/compare.py --base v0.1 --quick      # 3 rounds of 2 s

The base revision is checked out in a temporary git worktree and run from there (its
`PYTHONPATH` comes first), with this venv's packages. Both proxies have the access log off,
as `bench/run.py` does, and sit in front of the same mock.
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
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--extra", default="", help="TOML added to both configurations")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 3, 2.0
    config = QUIET + args.extra
    with checkout(args.base) as tree, contextlib.ExitStack() as stack:
        upstream, _ = stack.enter_context(procs.server(procs.mock()))
        base = f"base ({args.base})"
        started = {
            base: stack.enter_context(
                procs.imagegen_proxy(upstream, config, env={"PYTHONPATH": str(tree)})
            ),
            "working tree": stack.enter_context(procs.imagegen_proxy(upstream, config)),
        }
        result = load.side_by_side(started, args.rounds, args.seconds)
    table = load.cpu_table(result, base, "proxy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"settings": vars(args), **result}))
    (out / "compare.md").write_text(
        f"`python bench/compare.py --base {args.base}` ({args.rounds} rounds of "
        f"{args.seconds:g} s, median)\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
