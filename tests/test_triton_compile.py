"""Ahead-of-time compilation of every Triton kernel for sm_90 and sm_80, without a GPU.

The other tests run the kernels in the interpreter here, which accepts code the compiler
rejects and says nothing of shared memory or registers. This test drives the real host
functions with ``meta`` tensors, records each kernel launch instead of running it, and compiles
each recorded variant (its dtypes, its constexprs, the arguments' specialisations as Triton's
launcher derives them: 16-divisible pointers and integers, integers equal to 1 as constants,
None as a constant) with ``triton.compile`` and the bundled ptxas, in a subprocess where
``TRITON_INTERPRET`` is off. Autotuned kernels compile among the configurations their
``SharedMemoryPrune`` keeps for the target (the autotuner never compiles the others): for sm_90
the first and the largest (by shared memory) for the first variant, the largest for each other;
for sm_80 the first variant's first. The other kernels compile every variant for both targets.

It checks that each compiles, that the kernels' shared memory fits 227 KB per block on Hopper,
that the prune's estimate bounds the compiled size, that every ``*_kernel`` of
``modekernels.triton_kernels`` and every value of the constexprs the host passes was compiled,
and that the kernels other than the GEMMs do not spill registers, nor the tiles the GEMMs keep
for float32 "ieee" (all compiled for sm_90) more than a few (cuobjdump's stack size, where
Triton bundles cuobjdump). ``-s`` prints registers, spills and shared memory of each.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

HOPPER_SHARED_MEMORY = 232448  # bytes per block, opt-in maximum of sm_90 (227 KB)
AMPERE_SHARED_MEMORY = 166912  # sm_80 (163 KB)
TARGETS = {90: HOPPER_SHARED_MEMORY, 80: AMPERE_SHARED_MEMORY}
KERNEL_MODULES = ("grouped_mm", "moe_mlp", "routing", "neutral_residue", "glu_backward")


# ----------------------------------------------------------------------------------------------
# The subprocess: record launches, compile them, print one JSON object per compilation.
# ----------------------------------------------------------------------------------------------


def _host_calls():
    """The host functions with every constexpr branch, dtype and precision they launch with;
    meta tensors of realistic sizes (so the divisibility specialisation is the usual one)."""
    import torch
    from modekernels.triton_kernels import grouped_mm, moe_mlp, neutral_residue, routing

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
    i32, i64 = torch.int32, torch.int64
    # (dtype, allow_tf32): float32 runs ieee or tf32 per torch.backends.cuda.matmul.allow_tf32
    precisions = [(bf16, True), (fp32, False), (fp32, True), (fp16, True)]
    calls = []
    S, K, N, E = 4096, 1024, 2048, 8
    for dtype, tf32 in precisions:
        x, w = t(S, K, dtype=dtype), t(E, K, N, dtype=dtype)
        calls.append((tf32, grouped_mm.grouped_mm, (x, w, t(E, dtype=i32))))
        calls.append((tf32, grouped_mm.grouped_mm_weight_grad, (x, t(S, N, dtype=dtype), t(E, dtype=i32))))
    # moe_mlp's backward: x[token] (x_rows), gate·dy[token] (dy_rows, dy_scale) read in place
    rows = t(S, dtype=i64)
    calls.append((True, grouped_mm.grouped_mm_weight_grad, (t(S // 2, K), t(S, N), t(E, dtype=i32), rows)))
    calls.append((False, grouped_mm.grouped_mm_weight_grad, (
        t(S, K, dtype=fp32), t(S // 2, N, dtype=fp32), t(E, dtype=i32), None, rows, t(S, dtype=fp32),
    )))
    # dw in the nn.Linear layout (transposed=True): unit stride along K in the store
    calls.append((True, grouped_mm.grouped_mm_weight_grad, (
        t(S, K), t(S, N), t(E, dtype=i32), None, None, None, True,
    )))
    # w as a transposed view (stride 1 along K): the other B-operand layout
    w_t = t(E, N, K).transpose(1, 2)
    calls.append((True, grouped_mm.grouped_mm, (t(S, K), w_t, t(E, dtype=i32))))

    T, H, inner = 2048, 1024, 512
    # moe_mlp_up(x, perm, offs, w1, b1, activation, gated, top_k, keep)
    for (dtype, tf32), activation, gated, bias, keep, top_k in [
        (precisions[0], "silu", True, False, False, 2),
        (precisions[0], "gelu", False, True, True, 1),
        (precisions[1], "silu", True, True, True, 2),
        (precisions[2], "identity", False, False, False, 1),
        (precisions[3], "relu", True, True, True, 2),
    ]:
        n1 = 2 * inner if gated else inner
        calls.append((tf32, moe_mlp.moe_mlp_up, (
            t(T, H, dtype=dtype), t(T * top_k, dtype=i64), t(E, dtype=i32), t(E, H, n1, dtype=dtype),
            t(E, n1, dtype=dtype) if bias else None, activation, gated, top_k, keep,
        )))
    # moe_mlp_down(h, perm, offs, w2, b2, gate): top_k > 1 adds the slot sum
    for (dtype, tf32), bias, gate_dtype, top_k in [
        (precisions[0], False, fp32, 2),
        (precisions[1], True, bf16, 1),
        (precisions[2], True, fp32, 2),
        (precisions[3], False, fp16, 2),
    ]:
        calls.append((tf32, moe_mlp.moe_mlp_down, (
            t(T * top_k, inner, dtype=dtype), t(T * top_k, dtype=i64), t(E, dtype=i32),
            t(E, inner, H, dtype=dtype), t(E, H, dtype=dtype) if bias else None,
            t(T, top_k, dtype=gate_dtype),
        )))
    # the backward's row kernels: d pre through the activation / GLU, and dh = gate·dh + Σ dh·h
    for dtype, activation, gated in [(bf16, "silu", True), (fp32, "gelu", False), (fp16, "relu", True)]:
        n1 = 2 * inner if gated else inner
        calls.append((True, moe_mlp.activation_backward, (
            t(T, inner, dtype=dtype), t(T, n1, dtype=dtype), activation, gated,
        )))
        calls.append((True, moe_mlp.gate_backward, (
            t(T, inner, dtype=dtype), t(T, inner, dtype=dtype), t(T, dtype=fp32),
        )))

    # routing: narrow (E=8, 8 tiles per program), medium, and wide (1024 experts) blockings
    for dtype, tokens, experts in [(fp32, 1 << 20, 8), (bf16, 65536, 64), (fp16, 512, 1024)]:
        logits = t(tokens, experts, dtype=dtype)
        calls.append((True, routing.route_top1, (logits, tokens // experts)))
        calls.append((True, routing.route_top1_backward, (
            logits, t(tokens, dtype=fp32), t(tokens, dtype=i64), t(tokens, dtype=torch.bool),
            t(experts, dtype=i32), t(tokens, dtype=dtype), t(dtype=fp32), t(dtype=dtype),
        )))
    calls.append((True, routing.sort_by_expert, (t(4096, 2, dtype=i64), 8)))
    calls.append((True, routing.sort_by_expert, (t(4096, 1, dtype=i32), 300)))

    # neutral_residue(x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual,
    #                 activation, gate, sparse, keep_pre)
    T, D, DA = 4096, 1024, 256
    for (dtype, tf32), glu, bias, gate, activation, residual, sparse, keep in [
        (precisions[0], True, True, "sigmoid", "silu", True, True, True),
        (precisions[1], True, False, "relu", "gelu", False, False, True),
        (precisions[2], False, True, "none", "relu", True, False, False),
        (precisions[3], False, False, "relu", "silu", False, True, False),
    ]:
        def opt(*shape, given=True, dtype=dtype):
            return t(*shape, dtype=dtype) if given else None

        gated = gate != "none"
        calls.append((tf32, neutral_residue.neutral_residue, (
            t(T, D, dtype=dtype), t(DA, D, dtype=dtype), opt(DA, D, given=glu), t(D, DA, dtype=dtype),
            opt(D, given=gated), opt(given=gated and bias), opt(DA, given=bias),
            opt(DA, given=glu and bias), opt(D, given=bias), opt(T, D, given=residual),
            activation, gate, sparse, keep,
        )))
        n_pre = DA * (2 if glu else 1)
        calls.append((tf32, neutral_residue._glu_backward, (
            t(T, n_pre, dtype=dtype), t(T, DA, dtype=dtype), t(T, dtype=fp32), t(T, dtype=fp32),
            activation, glu, gate,
        )))
    return calls


class _Recorder:
    """Stands in for a kernel (a JITFunction or an Autotuner): ``kernel[grid](...)`` records the
    launch's arguments."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, self.kernel, args, kwargs))


def _kernels() -> list:
    """(module, name, kernel) of every ``*_kernel`` (JITFunction or Autotuner) of the modules."""
    import importlib

    import triton

    kernel_types = (triton.runtime.JITFunction, triton.runtime.Autotuner)
    modules = [importlib.import_module(f"modekernels.triton_kernels.{m}") for m in KERNEL_MODULES]
    return [(module, name, value) for module in modules for name, value in vars(module).items()
            if isinstance(value, kernel_types) and name.endswith("_kernel")]


def _kernel_name(module, name: str) -> str:
    return f"{module.__name__.rsplit('.', 1)[-1]}.{name}"


def _record_launches():
    import torch

    launches, kernels = [], _kernels()
    try:
        for module, name, value in kernels:
            setattr(module, name, _Recorder(_kernel_name(module, name), value, launches))
        for tf32, host, args in _host_calls():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            host(*args)
    finally:
        for module, name, value in kernels:
            setattr(module, name, value)
    return launches


def _specialize(value, specialize: bool, align: bool):
    """(signature type, divisible by 16) of an argument, as Triton's launcher specialises it."""
    import torch
    import triton.language as tl

    if value is None or isinstance(value, (str, tl.constexpr)):
        return "constexpr", False
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1 and specialize:
            return "constexpr", False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), specialize and align and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    if isinstance(value, torch.Tensor):
        name = {
            torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.int32: "i32", torch.int64: "i64", torch.bool: "u1",
        }[value.dtype]
        return "*" + name, specialize and align  # fresh allocations are 16-byte aligned
    raise TypeError(f"unexpected kernel argument {value!r}")


def _jobs():
    """One job per (kernel, variant, configuration, target); variants deduplicated."""
    import triton

    jobs, seen = [], set()
    variant_counts = {}
    for name, kernel, args, kwargs in _record_launches():
        autotuner = kernel if isinstance(kernel, triton.runtime.Autotuner) else None
        fn = autotuner.fn if autotuner else kernel
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        launch = dict(inspect.signature(fn.fn).bind_partial(*args, **kwargs).arguments)
        param_of = {param.name: param for param in fn.params}
        signature, constants, attrs = {}, {}, {}
        for i, param in enumerate(fn.params):
            if param.name not in launch:
                continue  # a block size the autotune configuration supplies
            value = launch[param.name]
            kind, divisible = ("constexpr", False) if param.is_constexpr else _specialize(
                value, not param.do_not_specialize, not param.do_not_specialize_on_alignment
            )
            signature[param.name] = kind
            if kind == "constexpr":
                constants[param.name] = value
            if divisible:
                attrs[i] = True
        variant = json.dumps({k: (str(v) if v is not None else None) for k, v in sorted(
            {**signature, **{f"{k}=": v for k, v in constants.items()}}.items())})
        if (name, variant) in seen:
            continue
        seen.add((name, variant))
        index = variant_counts.get(name, 0)
        variant_counts[name] = index + 1
        passed = {k: v for k, v in constants.items() if k in kwargs and param_of[k].is_constexpr}
        base = {"kernel": name, "variant": index, "signature": signature,
                "constants": constants, "attrs": sorted(attrs), "launch_constants": passed}
        for capability, limit in TARGETS.items():
            if autotuner is None:
                jobs.append({**base, "capability": capability, "config": {}, "options": options})
                continue
            prune = autotuner.early_config_prune
            configs = autotuner.configs
            kept = prune.kept(configs, launch, capability, limit)
            if capability == 80:
                chosen = kept[:1] if index == 0 else []
            elif passed.get("INPUT_PRECISION") == "ieee":
                chosen = kept  # the FMA tiles, each checked for spills
            else:
                largest = max(kept, key=lambda c: (
                    prune.shared_bytes(c, launch, capability), math.prod(c.kwargs.values())))
                chosen = [largest] if index or largest is kept[0] else [kept[0], largest]
            for config in chosen:
                jobs.append({
                    **base, "capability": capability, "config": dict(config.kwargs),
                    "options": {"num_warps": config.num_warps, "num_stages": config.num_stages},
                    "estimate": prune.shared_bytes(config, launch, capability),
                })
    return jobs


def _resources(cubin: bytes) -> dict:
    """Registers, stack and local (spill) bytes from cuobjdump, where Triton bundles one."""
    import tempfile

    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):  # a Triton without knobs: no resource report
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line for item in line.split())
    return {key.lower(): int(fields[key]) for key in ("REG", "STACK", "LOCAL") if key in fields}


def _compile(job: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = job["kernel"].split(".")
    kernel = getattr(importlib.import_module(f"modekernels.triton_kernels.{module}"), name)
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = dict(job["signature"], **{k: "constexpr" for k in job["config"]})
    signature = {name: signature[name] for name in fn.arg_names if name in signature}
    constants = {**job["constants"], **job["config"]}
    attrs = {(i,): [["tt.divisibility", 16]] for i in job["attrs"]}
    result = {k: job[k] for k in ("kernel", "variant", "capability", "config", "options", "launch_constants")}
    result["estimate"] = job.get("estimate")
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constants, attrs),
            target=GPUTarget("cuda", job["capability"], 32),
            options=job["options"],
        )
    except Exception as exc:  # noqa: BLE001 - any compile error is reported, then failed on
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-3000:])
    else:
        result.update(ok=True, shared=compiled.metadata.shared, **_resources(compiled.asm["cubin"]))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _worker() -> None:
    """Compile every job (two processes) and print one JSON line per result."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    print(json.dumps({"kernels": [_kernel_name(m, name) for m, name, _ in _kernels()]}))
    jobs = _jobs()
    # spawned, not forked: this process has threads (torch's)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=spawn) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_output():
    """(the ``*_kernel`` names of the modules, one dict per compilation) from the subprocess."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MODEKERNELS_AUTOTUNE")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its warning
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    kernels, *compilations = [json.loads(line) for line in proc.stdout.splitlines()
                              if line.startswith("{")]
    print(f"\n{len(compilations)} compilations in {time.perf_counter() - start:.0f} s")
    return kernels["kernels"], compilations


@pytest.fixture(scope="module")
def results(worker_output):
    return worker_output[1]


def test_every_variant_compiles(results):
    failures = [f"{r['kernel']} v{r['variant']} sm_{r['capability']} {r['config']}: {r['error']}"
                for r in results if not r["ok"]]
    assert not failures, "\n\n".join(failures)


def test_shared_memory_fits_and_prune_bounds_it(results):
    for r in results:
        if not r["ok"]:
            continue
        where = f"{r['kernel']} v{r['variant']} sm_{r['capability']} {r['config']} {r['options']}"
        assert r["shared"] <= TARGETS[r["capability"]], f"{where}: {r['shared']} bytes"
        if r["estimate"] is not None:
            assert r["shared"] <= r["estimate"], f"{where}: prune estimate {r['estimate']} < {r['shared']}"


def test_every_kernel_and_branch_is_compiled(worker_output, results):
    kernels = set(worker_output[0])
    compiled = {r["kernel"] for r in results if r["ok"]}
    assert len(kernels) >= 13 and kernels <= compiled, kernels - compiled
    # every value of every constexpr the host passes (activations, GATED, HAS_BIAS, gate modes,
    # INPUT_PRECISION, ...) is compiled for Hopper
    seen = {}
    for r in results:
        if r["capability"] == 90:
            for key, value in r["launch_constants"].items():
                seen.setdefault((r["kernel"], key), set()).add(str(value))
    for (kernel, key), values in seen.items():
        if kernel == "neutral_residue._project_gate_kernel" and key not in ("GATE", "HAS_B_GATE"):
            continue  # the gate-only launch fixes the switches its gate tile never reads
        if key in ("ACTIVATION",):
            assert len(values) >= 3, (kernel, key, values)
        elif key in ("GATED", "GLU", "HAS_BIAS", "KEEP_PRE", "HAS_B_IN", "HAS_B_GLU", "HAS_B_GATE",
                     "HAS_B_OUT", "HAS_RESIDUAL", "ROUTING", "INPUT_PRECISION", "GATHER_X",
                     "GATHER_DY", "SCALE_DY", "ROW_SCALE", "STORE_GH"):
            assert values == {"True", "False"} or values == {"ieee", "tf32"}, (kernel, key, values)
        elif key == "GATE":
            assert values >= {"1", "2"}, (kernel, key, values)


def test_report_and_no_spills_outside_the_gemms(results):
    """Prints registers, stack bytes (spills) and shared memory of each compilation (``-s``).
    The routing and elementwise kernels must not spill; the GEMM tiles' spills are reported."""
    spilling = []
    for r in sorted(results, key=lambda r: (r["kernel"], -r["capability"], r["variant"])):
        if not r["ok"]:
            continue
        print(f"{r['kernel']:42s} v{r['variant']} sm_{r['capability']} "
              f"{json.dumps(r['config']):48s} {r['options']} reg {r.get('reg')} "
              f"stack {r.get('stack')} shared {r['shared']} ({r['seconds']} s)")
        if r["estimate"] is None and r.get("stack", 0) > 0:
            spilling.append(f"{r['kernel']} v{r['variant']} sm_{r['capability']}: {r['stack']} bytes")
    assert not spilling, spilling


# Stack bytes per thread an FmaConfig tile may use on sm_90: a few spilled registers (Triton 3.6
# spills 8-16 bytes in some, 3.9 none), where the tensor-core tiles spilled up to 19 KB.
FMA_STACK_LIMIT = 32


def test_fma_tiles_do_not_spill(results):
    """Every configuration an autotuned kernel keeps for float32 "ieee" launches (its FmaConfig
    tiles, each compiled for sm_90) holds its tiles in registers, but for a few spilled values
    (``FMA_STACK_LIMIT``)."""
    fma = [r for r in results if r["ok"] and r["capability"] == 90 and r["estimate"] is not None
           and r["launch_constants"].get("INPUT_PRECISION") == "ieee"]
    kernels = {r["kernel"] for r in fma}
    assert {"grouped_mm._grouped_mm_kernel", "grouped_mm._grouped_mm_weight_grad_kernel",
            "moe_mlp._moe_up_kernel", "moe_mlp._moe_down_kernel"} <= kernels, kernels
    spilling = [f"{r['kernel']} v{r['variant']} {r['config']} {r['options']}: {r['stack']} bytes"
                for r in fma if r.get("stack", 0) > FMA_STACK_LIMIT]
    assert not spilling, spilling


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_autotune_switch_and_the_tiles_each_dot_keeps(autotune):
    """MODEKERNELS_AUTOTUNE=0 leaves each kernel its first configuration of each kind (outside
    the interpreter, which always runs one small configuration); the prune keeps the FmaConfig
    tiles for "ieee" launches and the others for the rest."""
    code = (
        "import torch\n"
        "from modekernels.triton_kernels.common import FmaConfig, tile_configs\n"
        "from modekernels.triton_kernels.grouped_mm import FORWARD_FMA_TILES, FORWARD_PRUNE, FORWARD_TILES\n"
        "configs = tile_configs(FORWARD_TILES, fma_tiles=FORWARD_FMA_TILES)\n"
        "assert configs[0].kwargs == dict(zip(('BLOCK_M', 'BLOCK_N', 'BLOCK_K'), FORWARD_TILES[0][:3]))\n"
        "x = torch.empty(4096, 1024, device='meta')\n"
        "kept = {p: FORWARD_PRUNE.kept(configs, {'x_ptr': x, 'K': 1024, 'INPUT_PRECISION': p}, 90, 232448)\n"
        "        for p in ('ieee', 'tf32')}\n"
        "assert kept['ieee'] and all(isinstance(c, FmaConfig) for c in kept['ieee'])\n"
        "assert kept['tf32'] and not any(isinstance(c, FmaConfig) for c in kept['tf32'])\n"
        "print(len(configs), len(kept['ieee']), len(FORWARD_TILES) + len(FORWARD_FMA_TILES))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "MODEKERNELS_AUTOTUNE": autotune}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    configs, ieee, tiles = map(int, out.stdout.split()[-3:])
    if autotune == "1":
        assert configs == tiles and ieee > 1
    else:
        assert configs == 2 and ieee == 1


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile with the interpreter off"
    _worker()
