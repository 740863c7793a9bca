"""`python -m dpokit.report RUN_DIR [--out FILE]`: the same as `dpokit report`, for environments without the script."""

from __future__ import annotations

import argparse
import sys

from dpokit.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpokit.report", description="Write a run's HTML report.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--out", metavar="FILE", help="where to write it (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir, out=args.out)
    except FileNotFoundError as e:
        print(f"dpokit: error: {e}", file=sys.stderr)
        return 2
    print(f"[dpokit] report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
