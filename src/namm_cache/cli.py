"""`namm-cache` command line: inspect and publish scorer repositories.

    namm-cache info NAME_OR_PATH        # config and card summary of a scorer (local, Hub cache, bundled)
    namm-cache push PATH REPO_ID        # upload a saved scorer folder as one commit
    namm-cache list                     # scorers bundled with the package
"""

from __future__ import annotations

import argparse
import os
import sys

from .hub import bundled_names, describe, load_scorer, push_scorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="namm-cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print a scorer's config and card summary")
    info.add_argument("name")
    info.add_argument("--revision")
    push = commands.add_parser("push", help="upload a saved scorer folder to the Hub")
    push.add_argument("path")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--message", default="Upload NAMM scorer")
    commands.add_parser("list", help="list bundled scorers")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            text = describe(load_scorer(args.name, revision=args.revision))
        elif args.command == "push":
            info = push_scorer(args.path, args.repo_id, private=args.private or None, create_pr=args.create_pr, commit_message=args.message)
            text = f"pushed {args.path} to {args.repo_id}: {getattr(info, 'commit_url', info)}"
        else:
            text = "\n".join(bundled_names())
    except (ValueError, OSError) as error:  # ScorerLoadError is a ValueError; OSError: files, network
        print(f"namm-cache: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`namm-cache info X | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second complaint at exit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
