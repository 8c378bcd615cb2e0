"""``gradtrace export RUN --parquet FILE [--stats ...]``: the run as one long table for pandas, polars, DuckDB."""
from __future__ import annotations

from typing import Any

from gradtrace.cli._common import load_run
from gradtrace.errors import EXIT_OK, UsageError


def add_parser(sub: Any) -> None:
    e = sub.add_parser("export", help="write the recorded numbers as a Parquet table (step, name, stat, value)")
    e.add_argument("run", help="trace directory")
    e.add_argument("--parquet", required=True, metavar="FILE", help="the Parquet file to write (needs pyarrow)")
    e.add_argument("--stats", nargs="+", default=None, metavar="STAT",
                   help="only these statistics (default: every numeric one)")


def main(args: Any) -> int:
    """Write the long table; a missing pyarrow or an unknown statistic is a one-line error (exit 2).

    Example:
        >>> from gradtrace.cli import build_parser
        >>> build_parser().parse_args(["export", "runs/exp1", "--parquet", "exp1.parquet"]).parquet
        'exp1.parquet'
    """
    from gradtrace.trace.export import write_parquet

    trace = load_run(args.run)
    try:
        rows = write_parquet(trace, args.parquet, args.stats)
    except KeyError as e:
        raise UsageError(f"gradtrace export: {e.args[0]}") from None
    except ValueError as e:
        raise UsageError(f"gradtrace export: {e}") from None
    print(f"{rows} rows written to {args.parquet}")
    return EXIT_OK
