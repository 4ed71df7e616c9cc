"""``modekernels bench [run]``: run the pytest-benchmark suites of ``bench/``, one JSON per suite.

Suites are the files ``bench/test_*.py``: ``--ops`` the kernel benchmarks, ``--models`` the
model-level ones (``bench/test_models_*.py``); neither flag means both. Each suite runs in its own
pytest subprocess with ``--benchmark-json``; as soon as it ends, its JSON gets a ``"run"`` entry
(device, device type, driver from ``nvidia-smi`` when present, CUDA, torch, triton and
transformers versions, git commit or ``$MODEKERNELS_BENCH_COMMIT``, UTC date, quick flag, sets,
suite and the pytest command) and is written to ``<out>/<device>/<stamp>-<suite>.json``
(``out`` defaults to ``bench/results``; ``stamp`` is the run's start, shared by its suites), so a
run killed part-way keeps every suite that finished. ``--quick`` sets
``MODEKERNELS_BENCH_QUICK=1`` (tiny sizes; always so on a CPU). Each suite is then summarised as
a table: per group, each provider's time, its fraction of the hardware limits measured in the
same run, and its speed ratio against every other provider of the group.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from modekernels.benchtool.results import Run, format_limit, format_time, groups, load_run

MODEL_PREFIX = "test_models_"
NO_TESTS_COLLECTED = 5  # pytest's exit code when -k leaves no case in a file
COMMIT_VARIABLE = "MODEKERNELS_BENCH_COMMIT"


@dataclasses.dataclass
class RunOptions:
    """What ``modekernels bench run`` was asked for."""

    ops: bool = False
    models: bool = False
    quick: bool = False
    keyword: str | None = None  # pytest -k
    bench_dir: str | None = None  # default: ./bench, else the one beside the package
    out: str | None = None  # default: <bench_dir>/results
    pytest_args: list[str] = dataclasses.field(default_factory=list)


def find_bench_dir(given: str | None = None) -> Path:
    """``given``, else ``./bench``, else the ``bench/`` of the checkout this package is installed
    from (editable install); ``FileNotFoundError`` when none holds a ``harness.py``."""
    import modekernels

    candidates = [Path(given)] if given else [
        Path.cwd() / "bench", Path(modekernels.__file__).resolve().parents[1] / "bench"
    ]
    for path in candidates:
        if (path / "harness.py").is_file():
            return path.resolve()
    raise FileNotFoundError(
        "no bench/ folder with harness.py at " + " or ".join(str(p) for p in candidates)
        + " (run from the repository root or pass --bench-dir)"
    )


def select_files(bench_dir: Path, ops: bool, models: bool) -> list[Path]:
    """The suite files of the chosen sets (both when neither is chosen), sorted."""
    if not ops and not models:
        ops = models = True
    files = sorted(bench_dir.glob("test_*.py"))
    return [f for f in files if (models if f.name.startswith(MODEL_PREFIX) else ops)]


def _git_commit(repo: Path) -> dict:
    """``{"commit", "dirty"}`` of the checkout ``repo``, both None where git cannot tell. The
    environment variable ``MODEKERNELS_BENCH_COMMIT``, when set, gives the commit instead (and
    ``dirty`` None): a working tree copied without ``.git`` to a GPU machine names its commit so."""
    given = os.environ.get(COMMIT_VARIABLE, "").strip()
    if given:
        return {"commit": given, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def device_slug(name: str) -> str:
    """A folder name for a device name: ``"NVIDIA H100 80GB HBM3 (sm_90)"`` ->
    ``"nvidia-h100-80gb-hbm3-sm_90"``."""
    slug = re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def run_metadata(data: dict, *, quick: bool, sets: list[str], command: list[str], repo: Path) -> dict:
    """The ``"run"`` entry for a finished run's JSON ``data`` (its ``modekernels`` block gives the
    device and versions as the benchmark process saw them; without it, this process's)."""
    import torch

    from modekernels import info

    found = data.get("modekernels") or {}
    versions = found.get("versions") or info.collect()["versions"]
    cuda = torch.cuda.is_available()
    device = found.get("device") or (
        torch.cuda.get_device_name() if cuda else info.collect()["devices"]["cpu"]["name"]
    )
    return {
        "device": device,
        "device_type": "cuda" if cuda else "cpu",
        "driver": _driver(),
        "cuda": versions.get("cuda (torch)"),
        "torch": versions.get("torch"),
        "triton": versions.get("triton"),
        "transformers": versions.get("transformers"),
        "python": versions.get("python"),
        "modekernels": versions.get("modekernels"),
        **_git_commit(repo),
        "date": _utc_now(),
        "quick": quick or not cuda or os.environ.get("MODEKERNELS_BENCH_QUICK", "0") == "1",
        "sets": sets,
        "command": command,
    }


def suite_name(suite: Path) -> str:
    """``bench/test_grouped_mm.py`` -> ``grouped_mm``: the suite's part of its JSON's name."""
    return suite.stem.removeprefix("test_")


def _pytest_command(suite: Path, bench_dir: Path, options: RunOptions) -> list[str]:
    # never parallel: pytest-benchmark switches itself off under xdist
    command = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
               "-p", "no:xdist", f"--rootdir={bench_dir}"]
    if options.keyword:
        command += ["-k", options.keyword]
    return command + options.pytest_args


def run_suite(suite: Path, bench_dir: Path, options: RunOptions, *, env: dict, sets: list[str],
              stamp: str) -> tuple[int, Path | None]:
    """Run one suite file in its own pytest process and, as soon as it ends, write its JSON to
    ``<out>/<device>/<stamp>-<suite>.json``; return (pytest's exit code, the JSON written or None
    when no benchmark ran: the ``-k`` selection left none, every case was skipped, or pytest
    died)."""
    command = _pytest_command(suite, bench_dir, options)
    print("$ " + " ".join(command), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        code = subprocess.run([*command, f"--benchmark-json={raw}"], cwd=bench_dir.parent, env=env).returncode
        if code == NO_TESTS_COLLECTED:
            return code, None
        if not raw.is_file():
            why = "every case was skipped" if code == 0 else f"pytest exited {code}"
            print(f"modekernels bench: {suite.name}: no JSON written ({why})", file=sys.stderr)
            return code, None
        data = json.loads(raw.read_text())
    data["run"] = {**run_metadata(data, quick=options.quick, sets=sets, command=command,
                                  repo=bench_dir.parent), "suite": suite.name}
    out_dir = Path(options.out) if options.out else bench_dir / "results"
    target = out_dir / device_slug(data["run"]["device"]) / f"{stamp}-{suite_name(suite)}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    print(format_summary(load_run(target)))
    print(f"\nwrote {target}", flush=True)
    return code, target


def run_benchmarks(options: RunOptions) -> tuple[int, list[Path]]:
    """Run the chosen suites one pytest process each, so that a run cut short keeps the JSON of
    every suite that finished; return (the first failing pytest exit code, else 1 when no suite
    wrote a JSON, else 0; the JSON files written)."""
    bench_dir = find_bench_dir(options.bench_dir)
    files = select_files(bench_dir, options.ops, options.models)
    if not files:
        print(f"modekernels bench: no benchmark files for that choice in {bench_dir}", file=sys.stderr)
        return 4, []
    sets = [name for name, on in (("ops", options.ops), ("models", options.models)) if on] or ["ops", "models"]
    # an xdist worker's variables would make pytest-benchmark think it runs under xdist
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    if options.quick:
        env["MODEKERNELS_BENCH_QUICK"] = "1"
    stamp = _utc_now().replace(":", "").replace("-", "")  # shared by the suites of one run
    codes, written = [], []
    for suite in files:
        code, target = run_suite(suite, bench_dir, options, env=env, sets=sets, stamp=stamp)
        codes.append(code)
        if target is not None:
            written.append(target)
    failed = [code for code in codes if code not in (0, NO_TESTS_COLLECTED)]
    if not written and not failed:
        print("modekernels bench: no benchmark ran", file=sys.stderr)
    return (failed[0] if failed else 0 if written else 1), written


def format_summary(run: Run) -> str:
    """Per group: each provider's mean time, fraction of the measured limits and speed ratio
    against each other provider of the group (``other mean / this mean``; above 1 is faster)."""
    meta = run.meta.get("run") or {}
    c = run.ceilings
    lines = [f"device: {run.device}   driver: {meta.get('driver')}   CUDA: {meta.get('cuda')}   "
             f"torch: {meta.get('torch')}   triton: {meta.get('triton')}   "
             f"transformers: {meta.get('transformers')}",
             f"commit: {meta.get('commit')}{' (dirty)' if meta.get('dirty') else ''}   "
             f"date: {run.date}   quick: {meta.get('quick')}"]
    if c:
        lines.append(f"limits: {c['matmul_tflops']:.1f} TFLOP/s ({c['matmul']}); "
                     f"{c['copy_gbps']:.1f} GB/s ({c['copy']})")
    for group, cases in groups(run.cases).items():
        peers = [case.provider for case in cases]
        lines += ["", group]
        lines.append(f"  {'provider':<14} {'mean':>12}  {'of limit':<24}"
                     + "".join(f" {'vs ' + p:>14}" for p in peers))
        for case in cases:
            ratios = []
            for other in cases:
                ok = other.mean_s and case.mean_s
                ratios.append(f"{other.mean_s / case.mean_s:.2f}x" if ok else "-")
            lines.append(f"  {case.provider:<14} {format_time(case.mean_s):>12}  "
                         f"{format_limit(case.extra):<24}" + "".join(f" {r:>14}" for r in ratios))
    return "\n".join(lines)
