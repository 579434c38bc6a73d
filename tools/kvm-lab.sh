#!/usr/bin/env bash
# Run a command inside the KVM lab: an L1 Linux under QEMU's TCG emulator with
# an emulated AMD SVM CPU, where kvm_amd provides a hardware-like /dev/kvm.
#
#   tools/kvm-lab.sh [--copy PATH]... [--] COMMAND [ARG]...
#   tools/kvm-lab.sh [--copy PATH]... --script FILE [ARG]...
#   tools/kvm-lab.sh --prepare      only install what the lab needs on the host
#
# QEMU: the lab needs QEMU 10 or newer. QEMU 7.2's TCG (Debian bookworm's own)
# crashed the L1 in about half of the boots that moved network traffic (the L1
# kernel took a recursive page fault right after leaving its guest, with the
# guest's GS base); on bookworm the lab installs QEMU from bookworm-backports.
#
# Inside the L1: `ledge` on PATH (from $LEDGE_BIN, target/release/ledge,
# target/debug/ledge or `command -v ledge`), the guest artifacts at the same
# $LEDGE_GUEST_DIR as on the host, a writable /tmp (the working directory),
# every LEDGE_* variable of the caller, LEDGE_KVM_KIND=kvm-amd-nested-lab,
# busybox plus bash. --copy puts a host file or directory at the same path in
# the L1. The command's output streams to stdout; the script exits with the
# command's exit code (124 on timeout, 125 if the lab itself failed).
#
# On a host with hardware KVM (/dev/kvm and no kvm_pvm module) the command runs
# directly on the host instead (LEDGE_LAB_MODE picks: auto, lab or direct).
#
# Environment:
#   LEDGE_LAB_MODE     auto (default), lab (always boot the L1) or direct
#                      (always run on the host)
#   LEDGE_LAB_TIMEOUT  overall timeout in seconds (default 900)
#   LEDGE_LAB_IDLE_TIMEOUT  seconds without console output after which the L1
#                      counts as hung (default 300; 0 = off). The L1's init
#                      prints a heartbeat every 30 s (filtered from the
#                      output), so only a wedged L1 goes quiet this long;
#                      QEMU is killed and the exit code is 125
#   LEDGE_LAB_MEM      L1 memory in MiB (default 4096)
#   LEDGE_LAB_SMP      L1 vCPUs (default 2)
#   LEDGE_LAB_CPU      QEMU CPU model (default EPYC,+svm,+npt)
#   LEDGE_LAB_TCG_THREAD  multi (default: one host thread per L1 vCPU) or
#                      single (the vCPUs take turns in 100 ms slices: a
#                      2-vCPU L2 guest crawls)
#   LEDGE_LAB_CACHE    cache of the L1 kernel, modules, busybox
#                      (default $HOME/.cache/ledge/lab)
#   LEDGE_LAB_MODULES  extra L1 kernel modules to load (space-separated names)
#   LEDGE_LAB_VERBOSE  1 to show the L1 kernel's boot messages
#   LEDGE_GUEST_DIR    guest artifacts (default $HOME/.cache/ledge/guest)
#   LEDGE_BIN          the ledge binary to use
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly REPO_DIR="${SCRIPT_DIR%/tools}"
readonly L1_INIT="${SCRIPT_DIR}/lab/init"

readonly TIMEOUT="${LEDGE_LAB_TIMEOUT:-900}"
readonly IDLE_TIMEOUT="${LEDGE_LAB_IDLE_TIMEOUT:-300}"
readonly MEM="${LEDGE_LAB_MEM:-4096}"
readonly SMP="${LEDGE_LAB_SMP:-2}"
readonly CPU="${LEDGE_LAB_CPU:-EPYC,+svm,+npt}"
readonly TCG_THREAD="${LEDGE_LAB_TCG_THREAD:-multi}"
readonly LAB_CACHE="${LEDGE_LAB_CACHE:-${HOME}/.cache/ledge/lab}"
readonly GUEST_DIR="${LEDGE_GUEST_DIR:-${HOME}/.cache/ledge/guest}"
# kvm-amd pulls in kvm, irqbypass and ccp through its dependencies; tun is for
# TAP tests.
readonly BASE_MODULES="kvm-amd tun"
readonly GUEST_ARTIFACTS=(vmlinux bzImage initramfs.cpio.gz rootfs.ext4 manifest.txt kernel.config)

log() { printf 'kvm-lab: %s\n' "$*" >&2; }
die() { printf 'kvm-lab: error: %s\n' "$*" >&2; exit 125; }

usage() {
    local text
    text="$(sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}")"
    if (("${1:-0}" == 0)); then
        printf '%s\n' "${text}"
    else
        printf '%s\n' "${text}" >&2
    fi
    exit "${1:-0}"
}

# --- arguments ---------------------------------------------------------------

SCRIPT_FILE=""
COPIES=()
PREPARE_ONLY=0
while (($# > 0)); do
    case "$1" in
        -h | --help) usage 0 ;;
        --prepare)
            PREPARE_ONLY=1
            shift
            ;;
        --script)
            (($# >= 2)) || die "--script needs a file"
            SCRIPT_FILE="$2"
            shift 2
            break
            ;;
        --copy)
            (($# >= 2)) || die "--copy needs a path"
            COPIES+=("$2")
            shift 2
            ;;
        --)
            shift
            break
            ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) break ;;
    esac
done
CMD_ARGS=("$@")
if ((PREPARE_ONLY)); then
    :
elif [[ -n "${SCRIPT_FILE}" ]]; then
    [[ -f "${SCRIPT_FILE}" ]] || die "script not found: ${SCRIPT_FILE}"
elif ((${#CMD_ARGS[@]} == 0)); then
    usage 2
fi
[[ "${TIMEOUT}" =~ ^[0-9]+$ ]] || die "LEDGE_LAB_TIMEOUT must be a number of seconds"
[[ "${IDLE_TIMEOUT}" =~ ^[0-9]+$ ]] || die "LEDGE_LAB_IDLE_TIMEOUT must be a number of seconds"
[[ "${MEM}" =~ ^[0-9]+$ ]] || die "LEDGE_LAB_MEM must be a number of MiB"
[[ "${TCG_THREAD}" == single || "${TCG_THREAD}" == multi ]] \
    || die "LEDGE_LAB_TCG_THREAD must be single or multi, not ${TCG_THREAD}"

find_ledge() {
    local c
    for c in "${LEDGE_BIN:-}" "${REPO_DIR}/target/release/ledge" "${REPO_DIR}/target/debug/ledge"; do
        if [[ -n "${c}" && -x "${c}" && -f "${c}" ]]; then
            printf '%s\n' "${c}"
            return 0
        fi
    done
    [[ -z "${LEDGE_BIN:-}" ]] || log "warning: LEDGE_BIN=${LEDGE_BIN} is not an executable file"
    command -v ledge 2>/dev/null || true
}
LEDGE_PATH="$(find_ledge)"
readonly LEDGE_PATH

# --- hardware KVM: run on the host ----------------------------------------------

MODE="${LEDGE_LAB_MODE:-auto}"
case "${MODE}" in
    auto)
        if [[ -e /dev/kvm && ! -d /sys/module/kvm_pvm ]]; then
            MODE=direct
            log "hardware KVM on this host: running the command directly, not in the lab"
        else
            MODE=lab
        fi
        ;;
    direct) log "LEDGE_LAB_MODE=direct: running the command directly on the host" ;;
    lab) ;;
    *) die "LEDGE_LAB_MODE must be auto, lab or direct, not ${MODE}" ;;
esac
readonly MODE

if [[ "${MODE}" == direct ]]; then
    export LEDGE_KVM_KIND="${LEDGE_KVM_KIND:-host}"
    export LEDGE_GUEST_DIR="${GUEST_DIR}"
    if [[ -n "${LEDGE_PATH}" ]]; then
        export LEDGE_BIN="${LEDGE_PATH}"
        PATH="$(dirname "${LEDGE_PATH}"):${PATH}"
    fi
    if [[ -n "${SCRIPT_FILE}" ]]; then
        exec bash "${SCRIPT_FILE}" "${CMD_ARGS[@]}"
    fi
    exec "${CMD_ARGS[@]}"
fi

# --- prerequisites -----------------------------------------------------------

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: $*"
    ((EUID == 0)) || die "need root to apt-get install: $*"
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# The major version of the installed qemu-system-x86_64, or 0.
qemu_major() {
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
    echo "${v:-0}"
}

ensure_qemu() {
    (($(qemu_major) >= 10)) && return 0
    local codename
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    if [[ "${codename}" == bookworm ]]; then
        local list=/etc/apt/sources.list.d/bookworm-backports.list
        if [[ ! -e "${list}" ]]; then
            log "adding bookworm-backports for QEMU 10"
            echo "deb http://deb.debian.org/debian bookworm-backports main" >"${list}"
            APT_UPDATED=0
        fi
        if ((!APT_UPDATED)); then
            apt-get update -qq >&2
            APT_UPDATED=1
        fi
        log "apt-get install -t bookworm-backports qemu-system-x86"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports qemu-system-x86 >&2
    else
        apt_install qemu-system-x86
    fi
    (($(qemu_major) >= 10)) ||
        log "warning: QEMU $(qemu_major) is older than 10: the nested lab is known to crash with it"
}

ensure_host_tools() {
    local missing=()
    ensure_qemu
    command -v cpio >/dev/null 2>&1 || missing+=(cpio)
    command -v modinfo >/dev/null 2>&1 || missing+=(kmod)
    [[ -x /bin/busybox ]] && dpkg-query -W busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# --- the cached L1 pieces -----------------------------------------------------

# Prints the base archive of the L1 (busybox, modules, modules.list); vmlinuz
# sits beside it. Both are built on first use. Archives are named by a hash of
# what goes into them, so runs with different LEDGE_LAB_MODULES can share the
# cache.
prepare_l1() {
    local pkg="${LEDGE_LAB_KERNEL_PKG:-}" dir want base
    if [[ -z "${pkg}" && -f "${LAB_CACHE}/current" ]]; then
        pkg="$(cat "${LAB_CACHE}/current")"
    fi
    if [[ -z "${pkg}" ]]; then
        pkg="$(resolve_kernel_pkg)"
    fi
    dir="${LAB_CACHE}/${pkg}"
    want="$(printf '%s\n' "${pkg}" "$(dpkg-query -W -f '${Version}' busybox-static)" \
        "${BASE_MODULES} ${LEDGE_LAB_MODULES:-}" | sha256sum | cut -d' ' -f1)"
    base="${dir}/base-${want:0:16}.cpio"
    if [[ -f "${base}" && -f "${dir}/vmlinuz" ]]; then
        printf '%s\n' "${base}"
        return 0
    fi
    log "preparing the L1 (${pkg}) in ${dir}"
    mkdir -p "${dir}"
    if [[ ! -d "${dir}/extract/boot" ]]; then
        fetch_kernel_pkg "${pkg}" "${dir}"
    fi
    build_l1_pieces "${dir}" "${base}"
    printf '%s\n' "${pkg}" >"${LAB_CACHE}/current"
    printf '%s\n' "${base}"
}

resolve_kernel_pkg() {
    local pkg
    pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | grep -o 'linux-image-[0-9][^ ]*-amd64' | head -n 1 || true)"
    if [[ -z "${pkg}" ]]; then
        ((EUID == 0)) || die "cannot find the Debian kernel package; run apt-get update as root"
        apt-get update -qq >&2
        APT_UPDATED=1
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | grep -o 'linux-image-[0-9][^ ]*-amd64' | head -n 1 || true)"
    fi
    [[ -n "${pkg}" ]] || die "apt-cache knows no linux-image-amd64 dependency; is this Debian with main enabled?"
    printf '%s\n' "${pkg}"
}

fetch_kernel_pkg() {
    local pkg="$1" dir="$2" deb
    log "downloading ${pkg}"
    rm -rf "${dir}/deb" "${dir}/extract"
    mkdir -p "${dir}/deb"
    (cd "${dir}/deb" && apt-get download -q -o APT::Sandbox::User=root "${pkg}" >&2) \
        || die "apt-get download ${pkg} failed"
    deb="$(find "${dir}/deb" -name '*.deb' | head -n 1)"
    [[ -n "${deb}" ]] || die "no .deb downloaded for ${pkg}"
    dpkg-deb -x "${deb}" "${dir}/extract"
    rm -rf "${dir}/deb"
}

# Finds a module file by name (dashes and underscores are interchangeable).
find_module() {
    local root="$1" name="$2" f
    f="$(find "${root}" \( -name "${name}.ko*" -o -name "${name//-/_}.ko*" -o -name "${name//_/-}.ko*" \) -print -quit)"
    [[ -n "${f}" ]] || die "kernel module ${name} not found under ${root}"
    printf '%s\n' "${f}"
}

build_l1_pieces() {
    local dir="$1" out="$2" root vmlinuz stage
    root="$(find "${dir}/extract/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)"
    [[ -n "${root}" ]] || die "no lib/modules in the extracted kernel package"
    vmlinuz="$(find "${dir}/extract/boot" -name 'vmlinuz-*' -print -quit)"
    [[ -n "${vmlinuz}" ]] || die "no vmlinuz in the extracted kernel package"
    cp "${vmlinuz}" "${dir}/vmlinuz.tmp"
    mv -f "${dir}/vmlinuz.tmp" "${dir}/vmlinuz"

    stage="${dir}/stage.$$"
    rm -rf "${stage}"
    mkdir -p "${stage}"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lab/modules}

    # Modules in dependency order (dependencies first), decompressed.
    : >"${stage}/lab/modules.list"
    local -A seen=()
    add_module() {
        local name="$1" f dep base
        [[ -z "${seen[${name//-/_}]:-}" ]] || return 0
        seen[${name//-/_}]=1
        f="$(find_module "${root}" "${name}")"
        for dep in $(modinfo -F depends "${f}" | tr ',' ' '); do
            add_module "${dep}"
        done
        base="$(basename "${f}")"
        base="${base%.ko*}.ko"
        case "${f}" in
            *.ko.xz) xz -dc "${f}" >"${stage}/lab/modules/${base}" ;;
            *.ko.zst) zstd -qdc "${f}" >"${stage}/lab/modules/${base}" ;;
            *.ko.gz) gzip -dc "${f}" >"${stage}/lab/modules/${base}" ;;
            *) cp "${f}" "${stage}/lab/modules/${base}" ;;
        esac
        printf '%s\n' "${base}" >>"${stage}/lab/modules.list"
    }
    local m
    for m in ${BASE_MODULES} ${LEDGE_LAB_MODULES:-}; do
        add_module "${m}"
    done

    # Busybox userspace, owned by root, as an uncompressed newc archive.
    cp /bin/busybox "${stage}/bin/busybox"
    local applet
    while IFS= read -r applet; do
        [[ "${applet}" == bin/busybox || -e "${stage}/${applet}" ]] && continue
        ln -s /bin/busybox "${stage}/${applet}"
    done < <(/bin/busybox --list-full)
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"${stage}/etc/passwd"
    printf 'root:x:0:\n' >"${stage}/etc/group"
    (cd "${stage}" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"${out}.tmp"
    mv -f "${out}.tmp" "${out}"
    rm -rf "${stage}"
}

# --- the per-run archive ---------------------------------------------------------

# Copies a host file or directory to the same path under the stage, with the
# shared libraries an ELF executable needs.
stage_copy() {
    local stage="$1" path="$2"
    mkdir -p "${stage}$(dirname "${path}")"
    cp -a -L "${path}" "${stage}${path}"
}

stage_executable() {
    local stage="$1" exe="$2" dest="$3" lib
    mkdir -p "${stage}$(dirname "${dest}")"
    cp -L "${exe}" "${stage}${dest}"
    chmod 0755 "${stage}${dest}"
    # Static binaries make ldd fail or print "not a dynamic executable".
    while IFS= read -r lib; do
        [[ -n "${lib}" && -e "${stage}${lib}" ]] && continue
        [[ -f "${lib}" ]] && stage_copy "${stage}" "${lib}"
    done < <(ldd "${exe}" 2>/dev/null | grep -o '/[^ ]*' || true)
}

shell_quote() {
    local s="$1"
    printf "'%s'" "${s//\'/\'\\\'\'}"
}

build_run_cpio() {
    local stage="$1" out="$2" name f

    mkdir -p "${stage}/lab" "${stage}/opt/ledge/bin" "${stage}/tmp"
    install -m 0755 "${L1_INIT}" "${stage}/init"

    stage_executable "${stage}" /bin/bash /bin/bash
    ln -s /bin/bash "${stage}/usr/bin/bash" 2>/dev/null || {
        mkdir -p "${stage}/usr/bin"
        ln -sf /bin/bash "${stage}/usr/bin/bash"
    }

    if [[ -n "${LEDGE_PATH}" ]]; then
        stage_executable "${stage}" "${LEDGE_PATH}" /opt/ledge/bin/ledge
    else
        log "warning: no ledge binary found (LEDGE_BIN, target/{release,debug}/ledge, PATH); running without it"
    fi

    if [[ -d "${GUEST_DIR}" ]]; then
        mkdir -p "${stage}${GUEST_DIR}"
        for f in "${GUEST_ARTIFACTS[@]}"; do
            [[ -f "${GUEST_DIR}/${f}" ]] && cp "${GUEST_DIR}/${f}" "${stage}${GUEST_DIR}/${f}"
        done
    else
        log "warning: no guest artifacts at ${GUEST_DIR} (run tools/build-guest.sh)"
    fi

    for f in "${COPIES[@]}"; do
        [[ -e "${f}" ]] || die "--copy: no such file or directory: ${f}"
        f="$(realpath "${f}")"
        stage_copy "${stage}" "${f}"
    done

    # LEDGE_* from the caller, then the paths as they are inside the L1.
    {
        while IFS= read -r name; do
            [[ "${name}" == LEDGE_* ]] || continue
            printf 'export %s=%s\n' "${name}" "$(shell_quote "${!name}")"
        done < <(compgen -e)
        printf 'export LEDGE_GUEST_DIR=%s\n' "$(shell_quote "${GUEST_DIR}")"
        if [[ -n "${LEDGE_PATH}" ]]; then
            printf 'export LEDGE_BIN=/opt/ledge/bin/ledge\n'
        else
            printf 'unset LEDGE_BIN\n'
        fi
    } >"${stage}/lab/env"

    {
        printf '#!/bin/sh\n'
        if [[ -n "${SCRIPT_FILE}" ]]; then
            install -m 0755 "${SCRIPT_FILE}" "${stage}/lab/script"
            if [[ "$(head -c 2 "${SCRIPT_FILE}")" == '#!' ]]; then
                printf 'exec /lab/script'
            else
                printf 'exec sh /lab/script'
            fi
        else
            printf 'exec'
        fi
        for f in "${CMD_ARGS[@]}"; do
            printf ' %s' "$(shell_quote "${f}")"
        done
        printf '\n'
    } >"${stage}/lab/cmd"
    chmod 0755 "${stage}/lab/cmd"

    (cd "${stage}" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"${out}"
}

# --- run -------------------------------------------------------------------------

[[ -f "${L1_INIT}" ]] || die "L1 init script not found: ${L1_INIT}"
T0=${SECONDS}
ensure_host_tools
((PREPARE_ONLY)) && exit 0
mkdir -p "${LAB_CACHE}"
# Concurrent runs share the cache: prepare it under a lock.
exec 9>"${LAB_CACHE}/.lock"
flock 9
L1_BASE="$(prepare_l1)"
flock -u 9
exec 9>&-
readonly L1_BASE
readonly L1_KERNEL="${L1_BASE%/*}/vmlinuz"

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ledge-lab.XXXXXX")"
readonly RUN_DIR
QEMU_PID=""
TAIL_PID=""
# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    if [[ -n "${QEMU_PID}" ]] && kill -0 "${QEMU_PID}" 2>/dev/null; then
        kill "${QEMU_PID}" 2>/dev/null || true
        wait "${QEMU_PID}" 2>/dev/null || true
    fi
    if [[ -n "${TAIL_PID}" ]]; then
        kill "${TAIL_PID}" 2>/dev/null || true
    fi
    rm -rf "${RUN_DIR}"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

build_run_cpio "${RUN_DIR}/stage" "${RUN_DIR}/run.cpio"
cat "${L1_BASE}" "${RUN_DIR}/run.cpio" >"${RUN_DIR}/initrd.cpio"
rm -rf "${RUN_DIR}/stage" "${RUN_DIR}/run.cpio"

KERNEL_ARGS="console=ttyS0 panic=-1 reboot=t"
if [[ "${LEDGE_LAB_VERBOSE:-0}" != 1 ]]; then
    KERNEL_ARGS+=" quiet"
fi
log "booting the L1 (TCG thread=${TCG_THREAD}, -cpu ${CPU}, ${MEM} MiB, ${SMP} vCPUs, timeout ${TIMEOUT} s, idle timeout ${IDLE_TIMEOUT} s; prepared in $((SECONDS - T0)) s)"

# The console log must exist before tail starts: the redirect below runs in the forked
# background job, and a tail that gets there first finds no file and streams nothing.
: >"${RUN_DIR}/console.log"
# timeout(1) forwards our TERM to QEMU and kills it when the time is up.
timeout -k 10 "${TIMEOUT}" qemu-system-x86_64 \
    -accel "tcg,thread=${TCG_THREAD}" -cpu "${CPU}" -m "${MEM}" -smp "${SMP}" \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "${L1_KERNEL}" -initrd "${RUN_DIR}/initrd.cpio" \
    -append "${KERNEL_ARGS}" </dev/null >>"${RUN_DIR}/console.log" 2>&1 &
QEMU_PID=$!

# Stream the console: drop carriage returns and the firmware's escape codes.
tail -n +1 -f --pid="${QEMU_PID}" "${RUN_DIR}/console.log" \
    | sed -u -e 's/\r$//' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' \
        -e '/^SeaBIOS (version/d' -e 's/^Booting from ROM\.\.//' \
        -e "/TCG doesn't support requested feature/d" \
        -e '/^\[ *[0-9.]*\] reboot: Restarting system$/d' -e '/^LEDGE-LAB-ALIVE$/d' &
TAIL_PID=$!

# The idle watchdog: the console (heartbeat included) must grow at least every
# IDLE_TIMEOUT seconds, or the L1 is wedged (a soft-locked CPU, a dead kernel
# that did not reboot) and waiting for the overall timeout only wastes time.
IDLE_KILLED=0
if ((IDLE_TIMEOUT > 0)); then
    last_size=-1
    last_change=${SECONDS}
    while kill -0 "${QEMU_PID}" 2>/dev/null; do
        sleep 2
        size="$(stat -c %s "${RUN_DIR}/console.log" 2>/dev/null || echo 0)"
        if ((size != last_size)); then
            last_size=${size}
            last_change=${SECONDS}
        elif ((SECONDS - last_change >= IDLE_TIMEOUT)); then
            IDLE_KILLED=1
            kill "${QEMU_PID}" 2>/dev/null || true
            break
        fi
    done
fi
QEMU_RC=0
wait "${QEMU_PID}" || QEMU_RC=$?
QEMU_PID=""
wait "${TAIL_PID}" 2>/dev/null || true
TAIL_PID=""

RC_LINE="$(tr -d '\r' <"${RUN_DIR}/console.log" | grep -a '^LEDGE-LAB-EXIT rc=[0-9]*$' | tail -n 1 || true)"
if [[ -n "${RC_LINE}" ]]; then
    RC="${RC_LINE#LEDGE-LAB-EXIT rc=}"
    log "command exited with ${RC}; lab run took $((SECONDS - T0)) s"
    exit "${RC}"
fi
if ((IDLE_KILLED)); then
    log "the L1 printed nothing for ${IDLE_TIMEOUT} s (LEDGE_LAB_IDLE_TIMEOUT), not even its heartbeat: it hung; QEMU killed"
    exit 125
fi
if ((QEMU_RC == 124 || QEMU_RC == 137)); then
    log "timed out after ${TIMEOUT} s (LEDGE_LAB_TIMEOUT); QEMU killed"
    exit 124
fi
log "the L1 stopped without reporting an exit code (qemu exit status ${QEMU_RC}); see the console output above"
exit 125
