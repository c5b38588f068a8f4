#!/usr/bin/env bash
# tools/device_check.sh: the GPU check (issue 13, item 5), one prepared command of under 5 minutes.
#
# On a machine with an NVIDIA GPU, from the repository root:
#   tools/device_check.sh             the card, the packages, the gpu-marked tests, `ptylive bench gpu`, a summary
#   tools/device_check.sh --quick     the same with the short benchmark (two gradient cases, one iteration case)
#   tools/device_check.sh --dry-run   no GPU needed: every step that needs none (packages, imports, collecting
#                                     the tests, the benchmark's own "no device" exit); ends non-zero
#   tools/device_check.sh --fetch-wheels
#                                     here, with an index: download the wheels a machine without one lacks
#                                     (PTYLIVE_WHEELS, default pyfftw) into .whl/, for Python 3.12 x86-64
#
# Where it writes: $OUT (the device tool's folder) or out/device-check/: device_check.log (everything
# printed), summary.md, gpu-tests.xml (JUnit), bench_gpu.json. Four files, so all come back from a device run.
#
# ptylive is not pip-installed: the working tree is put on the path as the package `ptylive` (a folder of
# symbolic links, the package-dir mapping of pyproject.toml), because a machine without an index cannot
# build it (build isolation fetches setuptools). Its dependencies come from the interpreter's own packages
# (PTYLIVE_PYTHON, default python3; the device image has numpy, scipy, numba, h5py, pytest and CuPy), then
# from a carried wheelhouse .whl/ (installed with --no-index into a scratch folder), then from the index where
# one answers (the gpu extra's cupy-cuda12x for CuPy). What is still missing is named, with how to carry it.
#
# Exit status: 0 when the card was found and every gpu-marked test passed (none failed, none errored, none
# skipped) and the benchmark ran; 1 when a step failed or a test did not pass; 3 when there is no GPU (and
# after --dry-run). A skipped test is reported as skipped, never as passed. Every step prints what it runs,
# its status and its duration; a failed step does not stop the later ones unless they need what it made.
set -u -o pipefail
# shellcheck disable=SC2329  # packages, missing_modules and cupy_smoke run through `bash -c` (exported below)

BUDGET_S=${PTYLIVE_CHECK_BUDGET_S:-285}  # the whole script; the device tool's start and transfers are extra
MODE=full
case "${1:-}" in
  "") ;;
  --quick) MODE=quick ;;
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
  *) echo "device_check.sh: unknown option '$1' (expected --quick, --dry-run, --fetch-wheels or --help)" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

if [ "$MODE" = fetch ]; then
  wheels=${PTYLIVE_WHEELS:-pyfftw}
  py=${PTYLIVE_PYTHON:-python3}
  mkdir -p .whl .git/info
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  echo "== fetch-wheels: $wheels for CPython 3.12 x86-64 into .whl/ (ignored through .git/info/exclude)"
  # shellcheck disable=SC2086  # one package name a word
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $wheels || exit 1
  ls -l .whl
  echo "carry it: run(command='tools/device_check.sh', carry=['.whl']); the wheels count towards the 64 MiB"
  exit 0
fi

# A hard cap on the whole run: the steps below keep to the budget themselves; this is the backstop.
if [ -z "${DEVICE_CHECK_CAPPED:-}" ]; then
  DEVICE_CHECK_CAPPED=1 exec timeout --kill-after=5 "$((BUDGET_S + 10))" "$REPO/tools/device_check.sh" "$@"
fi

OUT=${OUT:-$REPO/out/device-check}
mkdir -p "$OUT"
LOG=$OUT/device_check.log
: > "$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ptylive-device-check.XXXXXX")
SITE=$WORK/site
START_S=$(date +%s)
STEPS=()     # "name|status|seconds" of each step, for the summary
PY=${PTYLIVE_PYTHON:-python3}

say() { echo "$*" | tee -a "$LOG"; }
left_s() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

# step NAME LIMIT_S COMMAND...: run COMMAND (output to the screen and the log) within LIMIT_S and the budget;
# a function of this script runs as `bash -c NAME` (exported below), so that `timeout` can stop it.
step() {
  local name=$1 limit=$2; shift 2
  local left; left=$(left_s)
  if [ "$left" -lt 15 ]; then
    say "-- $name: NOT RUN (budget of ${BUDGET_S}s spent)"; STEPS+=("$name|not run: budget spent|0"); return 124
  fi
  [ "$limit" -gt $((left - 10)) ] && limit=$((left - 10))
  say "== $name (limit ${limit}s): $*"
  local t0 rc; t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0)) status
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  say "-- $name: $status, ${took}s"
  STEPS+=("$name|$status|$took")
  return "$rc"
}

# The package `ptylive` as pyproject.toml's package-dir maps it, made of links into the working tree.
make_shim() {
  mkdir -p "$WORK/shim/ptylive" || return 1
  ln -sf "$REPO"/ptylive_pkg/*.py "$WORK/shim/ptylive/" || return 1
  local folder
  for folder in daemon streaming gpu tools systemd; do ln -sfn "$REPO/$folder" "$WORK/shim/ptylive/$folder" || return 1; done
  export PYTHONPATH=$WORK/shim${PYTHONPATH:+:$PYTHONPATH}
}

# What the tests and the benchmark import, as module=distribution (the distribution pip would fetch).
NEEDED="numpy=numpy scipy=scipy numba=numba h5py=h5py pyfftw=pyfftw pytest=pytest hypothesis=hypothesis cupy=cupy-cuda12x>=13"
missing_modules() {
  local pair missing=""
  for pair in $NEEDED; do
    "$PY" -c "import ${pair%%=*}" >/dev/null 2>&1 || missing="$missing $pair"
  done
  echo "$missing"
}

packages() {
  local rc=0
  echo "python: $(command -v "$PY") ($("$PY" --version 2>&1))"
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then  # the device README's recipe
    echo "installing the carried wheelhouse .whl/ into $SITE: $(basename -a "$REPO"/.whl/*.whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$REPO"/.whl/*.whl || { rc=1; echo "the wheelhouse did not install (wheels for another Python or platform?)"; }
  fi
  local missing; missing=$(missing_modules)
  if [ -n "$missing" ] && [ "$MODE" != dry ]; then
    local pair distributions=""
    for pair in $missing; do distributions="$distributions ${pair#*=}"; done
    echo "missing:$missing; asking the package index for:$distributions (fails fast without one)"
    # shellcheck disable=SC2086  # one requirement a word
    "$PY" -m pip install -q --no-cache-dir --timeout 5 --retries 0 --target "$SITE" $distributions 2>&1 | tail -3
    missing=$(missing_modules)
  fi
  "$PY" - <<'EOF'
import importlib
for name in ("numpy", "scipy", "numba", "h5py", "pyfftw", "pytest", "hypothesis", "cupy"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:  # noqa: BLE001 - report every failure the same way
        print(f"  {name}: does not import ({type(error).__name__}: {error})")
EOF
  if [ -n "$missing" ]; then
    echo "STILL MISSING:$missing"
    [ "$MODE" = dry ] && echo "(--dry-run does not ask the package index)"
    echo "Where no package index answers, carry the wheels: here, in the repository root, with an index:"
    echo "  PTYLIVE_WHEELS='pyfftw ...' tools/device_check.sh --fetch-wheels   (CPython 3.12 x86-64 wheels into .whl/)"
    echo "then run(command='tools/device_check.sh', carry=['.whl']). CuPy itself is large: check its wheel against"
    echo "the 64 MiB the device tool carries, or use a machine whose Python has CuPy (the device image has cupy-cuda13x)."
    rc=1
  fi
  return "$rc"
}

cupy_smoke() {
  "$PY" - <<'EOF'
import cupy
count = cupy.cuda.runtime.getDeviceCount()
value = float((cupy.arange(1024, dtype=cupy.float32) ** 2).sum())  # compiles and runs a kernel
assert value == sum(float(i * i) for i in range(1024)), value
print(f"CuPy {cupy.__version__}: {count} device(s); a compiled kernel ran and agreed")
EOF
}

# pass/fail/skip counts of a JUnit file, and each skip's reason (a skip is not a pass).
junit_counts() {
  "$PY" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
cases = root.iter("testcase")
counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
reasons = {}
for case in cases:
    kinds = [child.tag for child in case]
    if "failure" in kinds:
        counts["failed"] += 1
    elif "error" in kinds:
        counts["errors"] += 1
    elif "skipped" in kinds:
        counts["skipped"] += 1
        reason = case.find("skipped").get("message", "")
        reasons[reason] = reasons.get(reason, 0) + 1
    else:
        counts["passed"] += 1
print(" ".join(f"{k}={v}" for k, v in counts.items()))
for reason, n in reasons.items():
    print(f"  skipped {n}: {reason}")
EOF
}

bench_summary() {
  "$PY" - "$1" <<'EOF'
import json
import sys
report = json.load(open(sys.argv[1]))
card = report["card"]
print(f"bench gpu ({report['size']}, {report['seconds']:.0f} s) on {card['name']}:")
for r in report["gradient"]:
    print(f"  gradient N={r['N']} S={r['S']} B={r['B']}: {r['gradient_us']:.2f} us/(pos.slice), "
          f"ratio to its bare cuFFTs {r['ratio']:.2f} (median {r['ratio_median']:.2f})")
for r in report["iteration"]:
    print(f"  iteration {r['slices']} slice(s): GPU {r['gpu']['iteration_s'] * 1e3:.2f} ms, CPU "
          f"{r['cpu']['iteration_s'] * 1e3:.1f} ms: speed-up {r['speedup']:.1f}; GPU/its cuFFTs {r['gpu']['ratio']:.2f}")
EOF
}

write_summary() {
  local verdict=$1
  {
    echo "# tools/device_check.sh ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START_S)) s of ${BUDGET_S} s"
    echo
    echo "- card: ${CARD:-none found}"
    echo "- commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "- python: ${PY_VERSIONS:-not checked}"
    echo "- gpu-marked tests: ${TESTS:-not run}"
    [ -n "${SKIPS:-}" ] && echo "$SKIPS" | sed 's/^/  /'
    echo "- benchmark:"
    echo "${BENCH:-  not run}" | sed 's/^/  /'
    echo "- steps:"
    local entry
    for entry in "${STEPS[@]}"; do IFS='|' read -r n s t <<<"$entry"; echo "  - $n: $s (${t}s)"; done
    echo
    echo "**$verdict**"
  } > "$OUT/summary.md"
  echo; cat "$OUT/summary.md"; cat "$OUT/summary.md" >> "$LOG"
}

export MODE PY SITE REPO NEEDED
export -f packages missing_modules cupy_smoke
say "tools/device_check.sh ($MODE) in $REPO, budget ${BUDGET_S}s, output in $OUT"

# 1. The card.
if step card 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
  CARD="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1) (name, memory, driver)"
else
  reason=$(command -v nvidia-smi >/dev/null 2>&1 && echo "nvidia-smi failed (no driver or no device)" || echo "no nvidia-smi on the PATH")
  say "NO GPU: $reason. This check needs a machine with an NVIDIA GPU and its driver."
  if [ "$MODE" != dry ]; then
    write_summary "NO GPU ($reason): nothing measured, no gpu-marked test ran. (--dry-run runs the steps that need no GPU.)"
    exit 3
  fi
fi

# 2. Python and the packages; 3. ptylive from the working tree.
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
step packages 90 bash -c packages
PY_VERSIONS=$("$PY" - 2>/dev/null <<'EOF'
import importlib, sys
found = [f"Python {sys.version.split()[0]}"]
for name in ("numpy", "cupy", "numba", "pyfftw", "scipy"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception:  # noqa: BLE001 - reported as missing
        found.append(f"{name} missing")
print(", ".join(found))
EOF
)
make_shim && step ptylive 30 "$PY" -c "import ptylive, ptylive.gpu.patches, ptylive.tools.bench_gpu; print('ptylive', ptylive.__version__, 'from', ptylive.__file__)"

if [ "$MODE" = dry ]; then
  step collect 60 "$PY" -m pytest -m gpu tests/gpu --collect-only -q -p no:cacheprovider
  step bench 30 "$PY" -m ptylive.tools.bench_gpu --quick
  write_summary "DRY RUN: no GPU was used; nothing measured, no gpu-marked test ran (the benchmark's exit 2 above is its 'no device')."
  exit 3
fi

# 4. CuPy on the device.
step cupy 60 bash -c cupy_smoke

# 5. The gpu-marked tests (tests/gpu: the CuPy path of every kernel and of whole iterations against numpy).
step tests 150 "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
tests_rc=$?
if [ -s "$OUT/gpu-tests.xml" ]; then
  counts=$(junit_counts "$OUT/gpu-tests.xml")
  TESTS=$(echo "$counts" | head -1)
  SKIPS=$(echo "$counts" | tail -n +2)
  say "gpu-marked tests: $TESTS"; [ -n "$SKIPS" ] && say "$SKIPS"
else
  TESTS="no JUnit report (pytest exit $tests_rc)"
fi

# 6. The benchmark: the full one where the budget allows it.
bench_mode=()
if [ "$MODE" = quick ] || [ "$(left_s)" -lt 150 ]; then bench_mode=(--quick); fi
step bench 200 "$PY" -m ptylive.tools.bench_gpu "${bench_mode[@]}" --json-out "$OUT/bench_gpu.json"
bench_rc=$?
[ "$bench_rc" -eq 0 ] && [ -s "$OUT/bench_gpu.json" ] && BENCH=$(bench_summary "$OUT/bench_gpu.json")

# The verdict.
not_ok=""
for entry in "${STEPS[@]}"; do IFS='|' read -r n s _ <<<"$entry"; [ "$s" = ok ] || not_ok="$not_ok $n ($s)"; done
verdict="PASSED: card found, every step ok, every gpu-marked test passed (none skipped), the benchmark ran"
if [ -n "$not_ok" ] || ! echo "${TESTS:-}" | grep -q 'failed=0 errors=0 skipped=0'; then
  verdict="NOT PASSED: steps not ok:${not_ok:- none}; gpu-marked tests: ${TESTS:-not run}"
fi
write_summary "$verdict"
rm -rf "$WORK"
case $verdict in PASSED*) exit 0 ;; *) exit 1 ;; esac
