#!/usr/bin/env bash
# One device call of a GPU session (see ../shared/GPU.md): build, then one stage, with everything
# worth keeping written under $RESULTS. Each stage stays under the device's 10-minute limit.
#
#   RESULTS=$OUT bash scripts/gpu_session.sh tests         # build + every test on the GPU
#   RESULTS=$OUT TESTS="tests/test_grouped_mm.py tests/test_moe_mlp.py" bash scripts/gpu_session.sh tests
#                                                          # ... or some of them (split a long run)
#   RESULTS=$OUT bash scripts/gpu_session.sh sanitize      # compute-sanitizer over the cuda paths
#   RESULTS=$OUT bash scripts/gpu_session.sh ops [-k EXPR] # kernel benchmarks -> JSON
#   RESULTS=$OUT bash scripts/gpu_session.sh models        # model-level benchmarks -> JSON
#   RESULTS=$OUT bash scripts/gpu_session.sh demo          # the demo, --device cuda --large
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
export MODEKERNELS_CUDA_ARCHS=${MODEKERNELS_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -5
python3 -m modekernels info | tee "$RESULTS/info.txt"

case "$stage" in
tests)
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
    for tool in memcheck racecheck; do
        MODEKERNELS_AUTOTUNE=0 compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -m pytest -q -x \
            tests/test_grouped_mm.py tests/test_routing.py tests/test_moe_mlp.py \
            tests/test_neutral_residue.py tests/test_moe_mlp_backward.py \
            -k "cuda and not compile and not opcheck" "$@" \
            2>&1 | tail -40 | tee "$RESULTS/sanitize-$tool.log"
    done
    ;;
ops | models)
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
