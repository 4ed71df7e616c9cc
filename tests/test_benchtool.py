"""Tests of ``modekernels bench``: compare, plot, the README table and a quick CPU run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from modekernels.benchtool import compare, run, table
from modekernels.cli import main as cli_main

BENCH = Path(__file__).resolve().parents[1] / "bench"
CEILINGS = {"matmul_tflops": 800.0, "matmul": "torch.mm bfloat16 8192x8192x8192",
            "copy_gbps": 3000.0, "copy": "Tensor.copy_ 1024 MiB, read + write"}


def write_run(path: Path, means: dict, *, device="NVIDIA H100 80GB HBM3", device_type="cuda",
              quick=False, date="2026-01-02T03:04:05Z") -> Path:
    """A synthetic run JSON: ``means`` maps (group, provider) to mean seconds."""
    benchmarks = []
    for (group, provider), mean in means.items():
        benchmarks.append({
            "group": group, "name": f"test_x[{group}-{provider}]",
            "fullname": f"bench/test_x.py::test_x[{group}-{provider}]",
            "stats": {"mean": mean},
            "extra_info": {"provider": provider, "baseline": "loop", "tflops": 1e-3 / mean,
                           "fraction_of_matmul": 1e-3 / mean / 800.0, "speedup": 1.0},
        })
    data = {"benchmarks": benchmarks, "datetime": date,
            "modekernels": {"device": device, "versions": {"torch": "2.11"}, "ceilings": CEILINGS},
            "run": {"device": device, "device_type": device_type, "quick": quick, "date": date,
                    "commit": "abc123", "driver": "580.1"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_compare_flags_more_than_five_percent_slower(tmp_path, capsys):
    old = write_run(tmp_path / "old.json", {("a", "triton"): 1.0, ("b", "triton"): 1.0,
                                            ("c", "triton"): 1.0, ("d", "triton"): 1.0})
    new = write_run(tmp_path / "new.json", {("a", "triton"): 1.06, ("b", "triton"): 1.04,
                                            ("c", "triton"): 0.9, ("e", "triton"): 1.0})
    rows, notes = compare.compare_runs(str(old), str(new))
    flags = {r.name.split("[")[1].split("-")[0]: r for r in rows}
    assert flags["a"].slower and flags["a"].flag.startswith("SLOWER")
    assert not flags["b"].slower and flags["b"].flag == ""
    assert flags["c"].flag == "faster"
    assert flags["d"].flag == "only in old" and flags["e"].flag == "only in new"
    assert abs(flags["a"].ratio - 1.06) < 1e-12 and notes == []

    assert cli_main(["bench", "compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "SLOWER" in line][0].startswith(
        "test_x.py::test_x[a-")
    assert "1 of 5 cases more than 5% slower" in out

    only_four = write_run(tmp_path / "four.json", {("a", "triton"): 1.04})
    base = write_run(tmp_path / "base.json", {("a", "triton"): 1.0}, device="NVIDIA H200")
    assert cli_main(["bench", "compare", str(base), str(only_four)]) == 0
    assert "devices differ" in capsys.readouterr().out


def test_plot_writes_png(tmp_path):
    path = write_run(tmp_path / "run.json", {("mm fwd E=8 S=64", "loop"): 2e-3,
                                             ("mm fwd E=8 S=64", "triton"): 1e-3,
                                             ("mm fwd E=4 S=32", "loop"): 1e-3})
    assert cli_main(["bench", "plot", str(path), "--out", str(tmp_path / "png")]) == 0
    written = list((tmp_path / "png").iterdir())
    assert [p.name for p in written] == ["mm_fwd.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_rewrites_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\ntext before\n\n", "\ntext after\n"
    readme.write_text(f"{before}{table.BEGIN}\nold table\n{table.END}{after}")
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)

    assert table.update_readme(readme, results)
    text = readme.read_text()
    assert text == f"{before}{table.BEGIN}\n{table.NO_RESULTS}\n{table.END}{after}"

    write_run(results / "nvidia-h100" / "r.json", {("grouped_mm fwd E=8", "triton"): 1e-3})
    write_run(results / "cpu" / "q.json", {("cpu smoke", "triton"): 1e-3}, device="x86_64",
              device_type="cpu", quick=True)
    (results / "notes.json").write_text("{}")  # not a run: passed over
    assert table.main(str(readme), str(results), check=True) == 1  # stale
    assert readme.read_text() == text
    assert table.main(str(readme), str(results)) == 0
    text = readme.read_text()
    assert text.startswith(before + table.BEGIN) and text.endswith(table.END + after)
    assert "### NVIDIA H100 80GB HBM3" in text and "| grouped_mm fwd E=8 | triton |" in text
    assert "cpu smoke" not in text and "old table" not in text
    assert not table.update_readme(readme, results)  # idempotent

    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        table.update_readme(readme, results)


def test_select_files_splits_ops_and_models():
    ops = run.select_files(BENCH, ops=True, models=False)
    assert BENCH / "test_grouped_mm.py" in ops
    assert not any(f.name.startswith("test_models_") for f in ops)
    both = run.select_files(BENCH, ops=False, models=False)
    assert set(ops) <= set(both)


TINY_OPS = '''
import pytest, torch
from harness import DEVICE, provider_params, report, run

@pytest.mark.parametrize("provider", provider_params("loop", "reference"))
def test_tiny(benchmark, ceilings, provider):
    a = torch.randn(16, 16)
    run(benchmark, lambda: a @ a, group="tiny mm M=16")
    report(benchmark, provider=provider, baseline="loop", ceilings=ceilings,
           flops=2 * 16**3, nbytes=3 * a.nbytes)
'''


def test_quick_ops_run_writes_json_with_metadata(tmp_path, capsys):
    """``modekernels bench --quick --ops`` over a bench folder holding the real harness and
    conftest and one tiny suite (a models suite beside it must not run)."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("harness.py", "conftest.py"):
        shutil.copy(BENCH / name, bench / name)
    (bench / "test_tiny.py").write_text(TINY_OPS)
    (bench / "test_models_tiny.py").write_text("def test_models():\n    raise AssertionError\n")
    if shutil.which("git"):
        for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit",
                                      "-q", "--allow-empty", "-m", "t"]):
            subprocess.run(["git", *args], cwd=tmp_path, check=True)

    out = tmp_path / "results"
    assert cli_main(["bench", "--quick", "--ops", "--bench-dir", str(bench), "--out", str(out)]) == 0
    [written] = list(out.rglob("*.json"))
    assert written.parent.parent == out and written.name.endswith("-ops.json")
    data = json.loads(written.read_text())
    meta = data["run"]
    assert meta["quick"] is True and meta["sets"] == ["ops"]
    for key in ("device", "device_type", "driver", "cuda", "torch", "triton", "transformers",
                "commit", "date"):
        assert key in meta, key
    import torch

    assert meta["torch"] == torch.__version__ and meta["date"].endswith("Z")
    if shutil.which("git"):
        assert len(meta["commit"]) == 40
    assert [b["extra_info"]["provider"] for b in data["benchmarks"]] == ["loop", "reference"]
    assert data["modekernels"]["ceilings"]["matmul_tflops"] > 0
    summary = capsys.readouterr().out
    assert "tiny mm M=16" in summary and "vs reference" in summary and "of mm" in summary
