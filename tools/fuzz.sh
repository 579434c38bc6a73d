#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target in fuzz/ and runs each one for a short, fixed
# time on a copy of its committed seed corpus (fuzz/corpus/<target>/; the repository is not
# modified). Fails if any target crashes, times out or runs out of memory; prints one line per
# target: "<target> execs=N cov=N ft=N crashes=N".
#
# Runs on the stable toolchain: targets are built without a sanitizer (-s none), which needs
# no nightly; libFuzzer's coverage instrumentation and the debug assertions (overflow checks)
# stay on. cargo-fuzz is installed into ~/.cargo/bin when missing.
#
# Environment:
#   LEDGE_FUZZ_SECONDS  seconds per target (default 20)
#   LEDGE_FUZZ_TARGETS  space-separated targets to run (default: all of `cargo fuzz list`)
#   LEDGE_FUZZ_KEEP     a directory to copy crash inputs into (default: only printed)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${LEDGE_FUZZ_SECONDS:-20}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "fuzz.sh: LEDGE_FUZZ_SECONDS must be a whole number of seconds, got '$secs'" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (once, into ~/.cargo/bin)"
    cargo install cargo-fuzz --locked
fi

echo "fuzz.sh: building the fuzz targets (stable, no sanitizer)"
if [ -n "${LEDGE_FUZZ_TARGETS:-}" ]; then
    # Only those named; a name that is no target is reported below.
    targets="$LEDGE_FUZZ_TARGETS"
    known=" $(cargo fuzz list | tr '\n' ' ') "
    for t in $targets; do
        if [[ "$known" == *" $t "* ]]; then
            cargo fuzz build -s none "$t"
        fi
    done
else
    targets="$(cargo fuzz list)"
    cargo fuzz build -s none
fi

triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="fuzz/target/$triple/release"
# On a tmpfs when there is one: the block target's flushes are then free.
tmp="${TMPDIR:-/tmp}"
[ -d /dev/shm ] && [ -w /dev/shm ] && tmp=/dev/shm
work="$(mktemp -d "$tmp/ledge-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# Image files and sockets the targets make.
export LEDGE_FUZZ_SCRATCH="$work/scratch"

failed=()
for t in $targets; do
    if [ ! -x "$bin_dir/$t" ]; then
        echo "fuzz.sh: no fuzz target '$t' (cargo fuzz list names them)" >&2
        failed+=("$t")
        continue
    fi
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    if [ -d "fuzz/corpus/$t" ]; then
        cp -r "fuzz/corpus/$t/." "$work/$t/corpus/"
    fi
    rc=0
    "$bin_dir/$t" "$work/$t/corpus" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$work/$t/artifacts/" \
        >"$work/$t/log" 2>&1 || rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t/log" | tail -1)"
    last="$(grep -E '^#[0-9]+[[:space:]]+(DONE|NEW|REDUCE|pulse|INITED)' "$work/$t/log" | tail -1 || true)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
    crashes="$(find "$work/$t/artifacts" -type f | wc -l)"
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1
    fi
    echo "$t execs=${execs:-?} cov=${cov:-?} ft=${ft:-?} crashes=$crashes"
    if [ "$crashes" -ne 0 ]; then
        failed+=("$t")
        echo "---- $t (exit $rc): the end of libFuzzer's log" >&2
        tail -40 "$work/$t/log" >&2
        for a in "$work/$t/artifacts"/*; do
            [ -f "$a" ] || continue
            echo "crash input: $(basename "$a") ($(wc -c <"$a") bytes), base64: $(base64 -w0 "$a" | head -c 4000)" >&2
            if [ -n "${LEDGE_FUZZ_KEEP:-}" ]; then
                mkdir -p "$LEDGE_FUZZ_KEEP/$t"
                cp "$a" "$LEDGE_FUZZ_KEEP/$t/"
            fi
        done
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: every target ran ${secs} s without a crash"
