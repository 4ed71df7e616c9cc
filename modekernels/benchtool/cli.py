"""The ``modekernels bench`` subcommand's arguments: ``run`` (the default), ``compare``,
``plot`` and ``table``. Each imports its module only when it runs.

Exit codes: 0 success; 1 a case more than 5% slower or missing (``compare``), a stale table
(``table --check``) or a failing suite (``run``); 2 a file or folder that cannot be used (a
missing or malformed JSON, a README without the markers, a ``--bench-dir`` without
``harness.py``), reported as ``modekernels bench: error: ...`` without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys

FILE_ERROR = 2


def _reporting_file_errors(command):
    """``command(args)``, with an unusable file or folder (``OSError``, or the ``ValueError``
    that the readers raise naming the file) printed as one error line and exit code 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (OSError, ValueError) as exc:
            print(f"modekernels bench: error: {exc}", file=sys.stderr)
            return FILE_ERROR

    return run


@_reporting_file_errors
def _run(args: argparse.Namespace) -> int:
    from modekernels.benchtool.run import RunOptions, run_benchmarks

    code, _ = run_benchmarks(RunOptions(
        ops=args.ops, models=args.models, quick=args.quick, keyword=args.keyword,
        bench_dir=args.bench_dir, out=args.out, pytest_args=args.pytest_arg or [],
    ))
    return code


@_reporting_file_errors
def _compare(args: argparse.Namespace) -> int:
    from modekernels.benchtool.compare import main

    return main(args.old, args.new)


@_reporting_file_errors
def _plot(args: argparse.Namespace) -> int:
    from modekernels.benchtool.plot import main

    return main(args.run_json, args.out)


@_reporting_file_errors
def _table(args: argparse.Namespace) -> int:
    from modekernels.benchtool.table import main

    return main(args.readme, args.results, args.check)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", action="store_true", help="the kernel benchmarks")
    parser.add_argument("--models", action="store_true",
                        help="the model-level benchmarks (bench/test_models_*.py); neither flag: both")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, few rounds (MODEKERNELS_BENCH_QUICK=1; always so on a CPU)")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k selection")
    parser.add_argument("--bench-dir", help="the bench/ folder (default ./bench or the checkout's)")
    parser.add_argument("--out", help="results folder (default bench/results); each suite's JSON "
                        "goes to OUT/<device>/<date>-<suite>.json")
    parser.add_argument("--pytest-arg", action="append", metavar="ARG",
                        help="one more argument for pytest (repeatable)")


def add_bench_parser(commands) -> None:
    """Add ``bench`` to the ``modekernels`` subcommands."""
    bench = commands.add_parser(
        "bench", help="run the benchmark suites (default), compare two runs, plot a run, "
        "regenerate the README results table",
    )
    _add_run_options(bench)
    bench.set_defaults(run=_run)
    actions = bench.add_subparsers(dest="bench_command", metavar="{run,compare,plot,table}")
    # an option not given after "run" keeps the value given before it (no default overrides it)
    run = actions.add_parser("run", argument_default=argparse.SUPPRESS,
                             help="run the suites, one JSON per suite (the default)")
    _add_run_options(run)
    run.set_defaults(run=_run)
    compare = actions.add_parser("compare", help="ratio per case; exit code 1 if a case is more "
                                 "than 5%% slower or missing from NEW, 2 if a file is unusable")
    compare.add_argument("old", help="OLD.json")
    compare.add_argument("new", help="NEW.json")
    compare.set_defaults(run=_compare)
    plot = actions.add_parser("plot", help="PNG charts of a run, with the measured limits")
    plot.add_argument("run_json", metavar="RUN.json")
    plot.add_argument("--out", help="folder for the PNGs (default <RUN>_plots beside the JSON)")
    plot.set_defaults(run=_plot)
    table = actions.add_parser("table", help="rewrite README.md's results section from "
                               "the GPU runs under bench/results")
    table.add_argument("--readme", help="default: README.md of the checkout")
    table.add_argument("--results", help="default: bench/results of the checkout")
    table.add_argument("--check", action="store_true", help="only say whether it is up to date "
                       "(exit code 1 if not)")
    table.set_defaults(run=_table)
