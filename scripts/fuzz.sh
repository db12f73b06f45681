#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/ (cargo-fuzz layout), one after the other.
#
#   scripts/fuzz.sh [--smoke | --runs N | --time S] [TARGET...]
#
#   --smoke     each target for a few seconds (FUZZ_SMOKE_SECONDS, default 10), built
#               unoptimised: for CI
#   --runs N    each target for N executions (default 10000000)
#   --time S    each target for S seconds instead
#   TARGET      frame, safetensors_header, http_request, embed_request (default: all)
#
# The targets and what each one calls are listed in fuzz/README.md.
#
# How it builds on a stable toolchain. cargo-fuzz is an ordinary crate: `cargo install
# cargo-fuzz --locked` builds it from the registry (the script does so into target/tools when
# it is missing, a few minutes on 2 cores). libFuzzer itself comes from the libfuzzer-sys
# crate, which compiles its C++ sources with the system's C++ compiler (g++ here). With
# `-s none` (no sanitizer, the default here: FUZZ_SANITIZER) cargo-fuzz passes only stable flags (-Cpasses=sancov-module and
# -Cllvm-args=-sanitizer-coverage-*, --cfg fuzzing, -Cdebug-assertions), so stable rustc builds
# the targets as they are. AddressSanitizer (`FUZZ_SANITIZER=address`) needs -Zsanitizer, a
# nightly flag: RUSTC_BOOTSTRAP=1 lets stable rustc take it, and the stable toolchain ships the
# runtime (librustc-stable_rt.asan.a). The script sets RUSTC_BOOTSTRAP=1 in both cases: some
# build scripts (proc-macro2, anyhow) rebuild when it changes, and with it everything above them,
# so switching it on and off would rebuild the instrumented tree (minutes) every time. The
# code under test is safe Rust, so a sanitizer mostly watches the dependencies' unsafe code
# (httparse's SIMD, serde_json); the bounds and overflow checks are on in both builds.
#
# What counts as a failure: a panic (an assertion of the target or in the code), a hang past
# FUZZ_TIMEOUT seconds on one input (default 10), an input that needs more than FUZZ_RSS_MB of
# memory or a single allocation above it (default 2048). libFuzzer then writes the input under
# fuzz/artifacts/TARGET/ and the script stops with its exit status. Reproduce one with
# `cargo fuzz run -s none TARGET fuzz/artifacts/TARGET/crash-...`, minimise it with
# `cargo fuzz tmin -s none TARGET fuzz/artifacts/TARGET/crash-...`.
#
# Corpora: the committed seeds are fuzz/corpus/TARGET (small, hand-made); what libFuzzer finds
# goes to fuzz/work/TARGET (git-ignored), which later runs start from. The seeds are read only.
#
# Each target is run under `nice -n 19`: this is meant to share a machine with builds.
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets=(frame safetensors_header http_request embed_request)
mode=runs
runs=10000000
# The smoke run builds unoptimised (`--dev`): a few seconds per target need coverage, not
# speed, and an optimised instrumented build of the tree (tokenizers included) takes many
# minutes on 2 cores.
profile=()
seconds=0
targets=()
while (($#)); do
    case "$1" in
        --smoke) mode=time; seconds="${FUZZ_SMOKE_SECONDS:-10}"; profile=(--dev) ;;
        --runs) mode=runs; runs="$2"; shift ;;
        --time) mode=time; seconds="$2"; shift ;;
        -h | --help) sed -n "2,11p" "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
((${#targets[@]})) || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
    [[ " ${all_targets[*]} " == *" $t "* ]] || { echo "fuzz.sh: no target $t (${all_targets[*]})" >&2; exit 2; }
done

sanitizer="${FUZZ_SANITIZER:-none}"
timeout_s="${FUZZ_TIMEOUT:-10}"
rss_mb="${FUZZ_RSS_MB:-2048}"
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"

# A cargo-fuzz on PATH is used; otherwise one is built into the repository (target/tools, ignored
# by git), so that a fresh machine gains nothing outside the checkout.
tools="$PWD/target/tools"
export PATH="$tools/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz --root target/tools (not found)"
    start=$SECONDS
    nice -n 19 cargo install --quiet --locked --root "$tools" cargo-fuzz
    echo "installed in $((SECONDS - start)) s"
fi

# Longest input per target: a frame, a request or a body fits in 4 KiB; a safetensors header
# with a few tensors needs more.
max_len() {
    case "$1" in
        safetensors_header) echo 16384 ;;
        *) echo 4096 ;;
    esac
}

echo "== build (sanitizer: $sanitizer)"
start=$SECONDS
nice -n 19 cargo fuzz build "${profile[@]}" -s "$sanitizer"
echo "built in $((SECONDS - start)) s"

for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
    if [[ $mode == runs ]]; then
        limit=(-runs="$runs")
    else
        limit=(-max_total_time="$seconds")
    fi
    echo "== $t (${limit[*]})"
    start=$SECONDS
    set +e
    nice -n 19 cargo fuzz run "${profile[@]}" -s "$sanitizer" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        "${limit[@]}" -timeout="$timeout_s" -rss_limit_mb="$rss_mb" -max_len="$(max_len "$t")" \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" 2>&1 |
        tee "fuzz/work/$t.log" | grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|==[0-9]+== ERROR|SUMMARY|.*panicked)'
    status=${PIPESTATUS[0]}
    set -e
    echo "$t: exit $status after $((SECONDS - start)) s (log: fuzz/work/$t.log)"
    ((status == 0)) || exit "$status"
done
