"""What ``modekernels info`` prints: versions, devices and each backend's availability."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from modekernels import backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return platform.processor() or platform.machine()


def _extension() -> str:
    """Whether modekernels._C is usable and, if so, the archs it holds and its GEMM families."""
    error = backends.cuda_extension_error()
    if error is not None:
        return error
    from modekernels import _C

    archs = ", ".join(f"sm_{sm}" for sm in _C.built_archs())
    gemms = "CUTLASS sm90 + sm80, SIMT" if _C.has_sm90_kernels() else "CUTLASS sm80, SIMT"
    return f"built and importable (kernels for {archs}; grouped GEMMs: {gemms})"


def _selected() -> str:
    """The backend choice of ``use_backend`` or the environment, "automatic", or why the
    setting is invalid (then every op call raises the same error)."""
    try:
        return backends.get_backend() or "automatic"
    except ValueError as exc:
        return f"invalid: {exc}"


def collect() -> dict:
    """Versions, devices and, per device, each backend's availability (None) or the reason."""
    return {
        "versions": {
            "python": platform.python_version(),
            "modekernels": _version("modekernels"),
            "torch": torch.__version__,
            "cuda (torch)": torch.version.cuda or "none",
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "devices": {
            str(device): {
                "name": _device_name(device),
                "backends": {name: backends.availability(name, device) for name in backends.BACKENDS},
            }
            for device in _devices()
        },
        "cuda extension": _extension(),
        "selected": _selected(),
    }


def format_info(info: dict) -> str:
    lines = ["modekernels environment", ""]
    lines += [f"  {name:<14} {version}" for name, version in info["versions"].items()]
    lines += ["", f"  cuda extension: {info['cuda extension']}"]
    lines += [f"  backend choice: {info['selected']}"]
    for device, entry in info["devices"].items():
        lines += ["", f"  {device}: {entry['name']}"]
        for name, reason in entry["backends"].items():
            lines.append(f"    {name:<10} " + ("available" if reason is None else f"unavailable: {reason}"))
    return "\n".join(lines)
