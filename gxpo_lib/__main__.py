"""Command line: `python -m gxpo_lib <command>`.

    run-notebooks [--out runs]       execute every notebook headless with its defaults (+ HTML copies)
    strip-notebooks [folder]         remove outputs from the stored notebooks
"""

from __future__ import annotations

import argparse
import sys

from . import notebooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run-notebooks", help="execute every notebook headless into a folder")
    run.add_argument("--out", default="runs")
    run.add_argument("--notebooks", default=str(notebooks.NOTEBOOK_DIR))
    strip = commands.add_parser("strip-notebooks", help="remove outputs from stored notebooks")
    strip.add_argument("folder", nargs="?", default=str(notebooks.NOTEBOOK_DIR))
    args = parser.parse_args(argv)

    if args.command == "run-notebooks":
        rows = notebooks.run_all(args.out, args.notebooks)
        failed = [r for r in rows if not r["ok"]]
        for row in failed:
            print(f"[gxpo] {row['notebook']} failed: {row['error']}", file=sys.stderr)
        print(f"[gxpo] {len(rows) - len(failed)} of {len(rows)} notebooks ran; outputs in {args.out}/")
        return 1 if failed else 0
    changed = [p.name for p in notebooks.find_notebooks(args.folder) if notebooks.strip_outputs(p)]
    print(f"stripped: {', '.join(changed) or 'nothing to strip'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
