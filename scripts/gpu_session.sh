#!/usr/bin/env bash
# One device call of a GPU session (see ../shared/GPU.md): build, then one stage, with everything
# worth keeping written under $RESULTS. Each stage stays under the device's 10-minute limit.
#
#   RESULTS=$OUT bash scripts/gpu_session.sh tests         # build + every test on the GPU
#   RESULTS=$OUT TESTS="tests/test_grouped_mm.py tests/test_moe_mlp.py" bash scripts/gpu_session.sh tests
#                                                          # ... or some of them (split a long run)
#   RESULTS=$OUT bash scripts/gpu_session.sh sanitize      # compute-sanitizer over the cuda paths
#   RESULTS=$OUT bash scripts/gpu_session.sh ops [-k EXPR] # kernel benchmarks -> one JSON per suite
#   RESULTS=$OUT bash scripts/gpu_session.sh models        # model-level benchmarks -> one JSON per suite
#   RESULTS=$OUT bash scripts/gpu_session.sh demo          # the demo, --device cuda --large
#
# The bench stages write each suite's JSON under $RESULTS/<device>/ as soon as the suite ends, so a
# call cut off at the time limit still brings back the suites that finished.
#
# The GPU machine gets the working tree without .git: name its commit in .bench_commit before the
# call, on this machine (`git rev-parse HEAD > .bench_commit`; an untracked file travels with the
# tree, an ignored one must be carried), and the bench stages record it in each JSON
# (MODEKERNELS_BENCH_COMMIT); without it the JSON's commit is null.
#
# The nvidia-cutlass headers, and pytest-xdist for the tests stage, come from wheels carried in
# .whl/ (pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0 pytest-xdist
# execnet), since the GPU machine has no network.
set -o pipefail
export PYTHONUNBUFFERED=1
: "${RESULTS:?set RESULTS to the folder to bring back}"
stage=${1:?stage: tests, sanitize, ops, models or demo}
shift

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site
fi
# Hopper only: 90a carries the generic, sm80 and sm90 kernels, and compiles in half the time of
# the default 80;90a. The build folder stays on a warm machine, so later stages rebuild nothing.
# MODEKERNELS_BUILD_CUDA=1: a CUDA build that fails fails the install (and this script), instead
# of leaving a package whose cuda backend is silently skipped.
export MODEKERNELS_CUDA_ARCHS=${MODEKERNELS_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} MODEKERNELS_BUILD_CUDA=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -5 \
    || { echo "gpu_session.sh: the install (CUDA build) failed; see above" >&2; exit 1; }
python3 -m modekernels info | tee "$RESULTS/info.txt" || exit 1
if [ -s .bench_commit ]; then
    MODEKERNELS_BENCH_COMMIT=$(head -n 1 .bench_commit)
    export MODEKERNELS_BENCH_COMMIT
fi

# Stop unless `modekernels info` reports the cuda backend available on cuda:0: otherwise every
# cuda test and benchmark case would be skipped, and the stage would look like a success.
require_cuda_backend() {
    python3 -m modekernels info --json | python3 -c '
import json, sys
devices = json.load(sys.stdin)["devices"]
reason = devices["cuda:0"]["backends"]["cuda"] if "cuda:0" in devices else "no CUDA device is visible"
sys.exit(f"gpu_session.sh: the cuda backend is unavailable: {reason}" if reason else 0)' || exit 1
}

case "$stage" in
tests)
    require_cuda_backend
    # untuned kernels: each odd test shape would otherwise be a new autotune key (bench tunes).
    # With pytest-xdist, WORKERS processes share the GPU and compile the Triton variants in
    # parallel (Triton's disk cache is shared between them).
    parallel=()
    if python3 -c "import xdist" 2>/dev/null; then parallel=(-n "${WORKERS:-8}"); fi
    # shellcheck disable=SC2086  # TESTS is a list of paths
    MODEKERNELS_AUTOTUNE=0 python3 -m pytest ${TESTS:-tests} -q -x --durations=15 "${parallel[@]}" "$@" \
        2>&1 | tee "$RESULTS/tests.log"
    ;;
sanitize)
    require_cuda_backend
    for tool in memcheck racecheck; do
        MODEKERNELS_AUTOTUNE=0 compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -m pytest -q -x \
            tests/test_grouped_mm.py tests/test_routing.py tests/test_moe_mlp.py \
            tests/test_neutral_residue.py tests/test_moe_mlp_backward.py \
            -k "cuda and not compile and not opcheck" "$@" \
            2>&1 | tail -40 | tee "$RESULTS/sanitize-$tool.log"
    done
    ;;
ops | models)
    require_cuda_backend
    python3 -m modekernels bench "--$stage" --out "$RESULTS" "$@" 2>&1 | tee "$RESULTS/bench-$stage.log"
    ;;
demo)
    python3 -m modekernels demo --device cuda --large --out "$RESULTS/demo" "$@" 2>&1 | tee "$RESULTS/demo.log"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
