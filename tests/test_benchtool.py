"""Tests of ``modekernels bench``: compare, plot, the README table, the command line, quick
CPU runs, and the pieces of ``bench/`` the suites share."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modekernels.benchtool import compare, run, table
from modekernels.cli import build_parser
from modekernels.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
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
    assert flags["d"].flag == "MISSING from new" and flags["e"].flag == "only in new"
    assert abs(flags["a"].ratio - 1.06) < 1e-12 and notes == []

    assert cli_main(["bench", "compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "SLOWER" in line][0].startswith(
        "test_x.py::test_x[a-")
    assert "1 of 5 cases more than 5% slower; 1 of old's cases missing from new" in out

    only_four = write_run(tmp_path / "four.json", {("a", "triton"): 1.04})
    base = write_run(tmp_path / "base.json", {("a", "triton"): 1.0}, device="NVIDIA H200")
    assert cli_main(["bench", "compare", str(base), str(only_four)]) == 0
    assert "devices differ" in capsys.readouterr().out


def test_compare_fails_on_a_case_missing_from_new(tmp_path, capsys):
    old = write_run(tmp_path / "old.json", {("a", "triton"): 1.0, ("b", "triton"): 1.0})
    new = write_run(tmp_path / "new.json", {("a", "triton"): 1.0, ("c", "triton"): 1.0})
    assert cli_main(["bench", "compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "MISSING" in line][0].startswith("test_x.py::test_x[b-")
    assert "0 of 3 cases more than 5% slower; 1 of old's cases missing from new" in out
    assert cli_main(["bench", "compare", str(old), str(old)]) == 0


def test_unusable_files_exit_2_with_one_error_line(tmp_path, capsys):
    good = write_run(tmp_path / "good.json", {("a", "triton"): 1.0})
    malformed = tmp_path / "malformed.json"
    malformed.write_text("{not json")
    no_markers = tmp_path / "README.md"
    no_markers.write_text("no markers\n")
    commands = [
        ["compare", str(tmp_path / "missing.json"), str(good)],
        ["compare", str(good), str(malformed)],
        ["plot", str(malformed)],
        ["table", "--readme", str(no_markers), "--results", str(tmp_path)],
        ["table", "--readme", str(tmp_path / "missing.md"), "--results", str(tmp_path)],
        ["--bench-dir", str(tmp_path), "--quick"],
    ]
    for command in commands:
        assert cli_main(["bench", *command]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("modekernels bench: error: ") and "Traceback" not in err, err
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [
    ["bench", "--ops", "--quick", "-k", "mm", "run"],
    ["bench", "run", "--ops", "--quick", "-k", "mm"],
    ["bench", "--ops", "run", "--quick", "-k", "mm"],
])
def test_run_options_count_before_and_after_run(argv):
    args = build_parser().parse_args(argv)
    assert (args.ops, args.models, args.quick, args.keyword) == (True, False, True, "mm")


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


def test_results_readme_table_is_up_to_date_and_names_real_folders():
    """The README's results table matches the committed GPU JSON (``--check``), and the results
    folder's README shows device folders as ``modekernels bench`` names them."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stdout
    example = run.device_slug("NVIDIA H100 80GB HBM3 (sm_90)")
    assert f"bench/results/{example}/" in (BENCH / "results" / "README.md").read_text()


def test_commit_override_for_a_tree_without_git(tmp_path, monkeypatch):
    monkeypatch.delenv(run.COMMIT_VARIABLE, raising=False)
    if shutil.which("git"):
        assert run._git_commit(tmp_path)["commit"] is None  # no .git there
    monkeypatch.setenv(run.COMMIT_VARIABLE, "0123abcd" * 5 + "\n")
    assert run._git_commit(tmp_path) == {"commit": "0123abcd" * 5, "dirty": None}
    assert run._git_commit(ROOT)["commit"] == "0123abcd" * 5  # even where git could tell


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


KILLED_OPS = '''
import os, signal

def test_killed():  # a suite cut off, as at the device's time limit
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_quick_ops_run_writes_json_per_suite_as_each_ends(tmp_path, capsys):
    """``modekernels bench --quick --ops`` over a bench folder holding the real harness and
    conftest, one tiny suite and one killed mid-run: the tiny suite's JSON, with its metadata,
    is written before the kill and kept; a models suite beside them must not run."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("harness.py", "conftest.py"):
        shutil.copy(BENCH / name, bench / name)
    (bench / "test_tiny.py").write_text(TINY_OPS)
    (bench / "test_zz_killed.py").write_text(KILLED_OPS)
    (bench / "test_models_tiny.py").write_text("def test_models():\n    raise AssertionError\n")
    if shutil.which("git"):
        for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit",
                                      "-q", "--allow-empty", "-m", "t"]):
            subprocess.run(["git", *args], cwd=tmp_path, check=True)

    out = tmp_path / "results"
    assert cli_main(["bench", "--quick", "--ops", "--bench-dir", str(bench), "--out", str(out)]) != 0
    [written] = list(out.rglob("*.json"))
    assert written.parent.parent == out and written.name.endswith("-tiny.json")
    data = json.loads(written.read_text())
    meta = data["run"]
    assert meta["quick"] is True and meta["sets"] == ["ops"] and meta["suite"] == "test_tiny.py"
    for key in ("device", "device_type", "driver", "cuda", "torch", "triton", "transformers",
                "commit", "date"):
        assert key in meta, key
    assert meta["torch"] == torch.__version__ and meta["date"].endswith("Z")
    if shutil.which("git"):
        assert len(meta["commit"]) == 40
    assert [b["extra_info"]["provider"] for b in data["benchmarks"]] == ["loop", "reference"]
    assert data["modekernels"]["ceilings"]["matmul_tflops"] > 0
    captured = capsys.readouterr()
    assert "tiny mm M=16" in captured.out and "vs reference" in captured.out and "of mm" in captured.out
    assert "test_zz_killed.py: no JSON written (pytest exited -9)" in captured.err


def _bench_module(name: str, monkeypatch):
    """``bench/<name>.py`` imported as ``bench_<name>`` (``tests/`` has files of the same
    names), with ``bench/`` on the path for its ``harness`` imports."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _harness(monkeypatch):
    """``bench/harness.py`` as the bench suites import it."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("harness")


def _pretend_gpu(harness, monkeypatch, free_bytes: int) -> None:
    monkeypatch.setattr(harness, "DEVICE", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 80 * 2**30))


def test_batched_mm_guard_skips_the_qwen3moe_training_step(monkeypatch):
    """transformers' batched_mm gathers 288 GiB for Qwen3-MoE-like training on 4 x 1024
    tokens: skipped on an 80 GB GPU, and by the model benchmark before it builds the model."""
    harness = _harness(monkeypatch)
    qwen3moe_train = (4 * 1024, 2048, 768, 8)
    assert harness.batched_mm_bytes(*qwen3moe_train, torch.bfloat16) == 288 * 2**30
    _pretend_gpu(harness, monkeypatch, free_bytes=78 * 2**30)
    with pytest.raises(pytest.skip.Exception, match="288 GiB"):
        harness.skip_unless_batched_mm_fits(*qwen3moe_train, torch.bfloat16)
    harness.skip_unless_batched_mm_fits(512, 2048, 768, 8, torch.bfloat16)  # 36 GiB: runs

    models_moe = _bench_module("test_models_moe", monkeypatch)
    _pretend_gpu(harness, monkeypatch, free_bytes=1 << 20)  # below the quick sizes' need
    with pytest.raises(pytest.skip.Exception, match="batched_mm would gather"):
        models_moe.test_moe_model(None, None, "qwen3moe", "train", "batched_mm")


def test_neutral_residue_forward_builds_no_graph(monkeypatch):
    """Every provider's forward-only case runs without autograd state (as eager and triton do),
    and its forward+backward case still has something to differentiate."""
    nr = _bench_module("test_neutral_residue", monkeypatch)
    d, d_a, T = 48, 8, 40
    for provider in ("eager", "peft_lora", "linear_adapter", "triton", "triton_sparse"):
        for backward in (False, True):
            t = nr.make_block(T, d, d_a, 0.5, backward)
            forward, trainable = nr.provider_forward(provider, t, d, d_a, backward)
            if backward:
                assert trainable and all(v.requires_grad for v in trainable), provider
            else:
                outputs = nr.step(forward, trainable, backward)()
                assert not any(o.requires_grad for o in outputs), provider


def test_report_records_the_fraction_of_a_bar_floor(monkeypatch):
    harness = _harness(monkeypatch)
    monkeypatch.setattr(harness, "records", [])
    benchmark = SimpleNamespace(stats=SimpleNamespace(stats=SimpleNamespace(mean=1e-3)),
                                extra_info={}, group="g")
    ceilings = harness.Ceilings(800.0, "mm", 3000.0, "copy")
    harness.report(benchmark, provider="p", baseline="p", ceilings=ceilings, nbytes=3e9,
                   bar_nbytes=2e9)
    extra = benchmark.extra_info
    assert extra["fraction_of_copy"] == pytest.approx(1.0)
    assert extra["fraction_of_bar_floor"] == pytest.approx(2e9 / 3e12 / 1e-3)
    harness.report(benchmark, provider="p", baseline="p", ceilings=ceilings, nbytes=3e9)
    assert len(harness.records) == 2


def test_quick_suites_record_bar_floor_and_moe_baseline(tmp_path):
    """Three real suites, a few quick cases: the neutral-residue forward records
    ``fraction_of_bar_floor``, the MoE models' speedups are against transformers' ``grouped_mm``
    (the provider their bar is stated against), and a suite that ``-k`` leaves empty is no
    failure."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("harness.py", "model_harness.py", "conftest.py", "test_neutral_residue.py",
                 "test_models_moe.py", "test_routing.py"):
        shutil.copy(BENCH / name, bench / name)
    keyword = ("(test_neutral_residue and fwd-eager and off0) or "
               "(test_models_moe and qwen3moe-infer-grouped_mm)")
    out = tmp_path / "results"
    assert cli_main(["bench", "--quick", "-k", keyword, "--bench-dir", str(bench),
                     "--out", str(out)]) == 0
    written = {p.name.split("-", 1)[1]: json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert sorted(written) == ["models_moe.json", "neutral_residue.json"]
    [nr] = written["neutral_residue.json"]["benchmarks"]
    assert 0 < nr["extra_info"]["fraction_of_bar_floor"] < nr["extra_info"]["fraction_of_copy"]
    [moe] = written["models_moe.json"]["benchmarks"]
    assert moe["extra_info"]["baseline"] == "grouped_mm" and moe["extra_info"]["speedup"] == 1.0
    assert not list(out.rglob("*-routing.json"))
