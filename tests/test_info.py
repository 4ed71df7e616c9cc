"""``modekernels info`` (and ``python -m modekernels info``): versions, devices, each backend's
availability with the reason where it cannot run, and what the CUDA extension holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from modekernels import backends
from modekernels.cli import main


def test_info_lists_versions_devices_and_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for package in ("torch", "triton", "transformers", "modekernels"):
        assert package in out
    assert "cuda extension: " in out
    for name in backends.BACKENDS:
        assert f"    {name} " in out
    if not torch.cuda.is_available():
        assert "cuda       unavailable: the cuda backend needs CUDA tensors" in out


def test_info_json_matches_the_availability_of_each_backend(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"versions", "devices", "cuda extension", "selected"}
    cpu = info["devices"]["cpu"]["backends"]
    assert cpu["reference"] is None
    for name, reason in cpu.items():
        assert reason == backends.availability(name, torch.device("cpu"))
    extension = info["cuda extension"]
    if backends.cuda_extension_error() is None:
        from modekernels import _C

        assert extension.startswith("built and importable")
        assert all(f"sm_{sm}" in extension for sm in _C.built_archs())
        assert ("CUTLASS sm90" in extension) == _C.has_sm90_kernels()
    else:
        assert extension == backends.cuda_extension_error()


def test_python_dash_m_runs_info():
    out = subprocess.run([sys.executable, "-m", "modekernels", "info"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("modekernels environment")


def test_info_reports_an_invalid_backend_setting(capsys, monkeypatch):
    """An unknown MODEKERNELS_BACKEND is part of the report (every op call would raise), not a
    traceback: the command still prints everything and exits 0."""
    monkeypatch.setenv(backends.ENV_VAR, "cutlass")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert ("  backend choice: invalid: the environment variable MODEKERNELS_BACKEND must be one "
            "of ('reference', 'triton', 'cuda') or None, got 'cutlass'") in out
    assert "    reference  available" in out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected"].startswith("invalid: ")
    env = {**os.environ, backends.ENV_VAR: "cutlass"}
    run = subprocess.run([sys.executable, "-m", "modekernels", "info"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert "backend choice: invalid" in run.stdout
