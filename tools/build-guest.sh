#!/usr/bin/env bash
# Build the Linux guest used by Ledge's Linux-guest tests.
#
#   tools/build-guest.sh [OUT_DIR]
#
# OUT_DIR defaults to ${LEDGE_GUEST_DIR:-$HOME/.cache/ledge/guest}. Produces:
#   vmlinux            ELF kernel with the PVH entry note (boot with PVH)
#   bzImage            the same kernel as a bzImage
#   initramfs.cpio.gz  busybox userspace, /init from resources/guest/init
#   rootfs.ext4        the same userspace as a small ext4 image
#   manifest.txt       input hash, kernel release, package versions
#
# Inputs: Debian's linux-source-6.1 and busybox-static packages, plus
# resources/guest/{microvm.config,init} and this script. The outputs are cached
# by a hash of all of those; an unchanged second run returns at once. The
# kernel tree is kept under OUT_DIR/build so that a config change rebuilds
# incrementally.
set -euo pipefail

readonly SCRIPT_PATH="${BASH_SOURCE[0]}"
SCRIPT_DIR="$(cd "$(dirname "${SCRIPT_PATH}")" && pwd)"
readonly SCRIPT_DIR
readonly REPO_DIR="${SCRIPT_DIR%/tools}"
readonly GUEST_RES="${REPO_DIR}/resources/guest"
readonly FRAGMENT="${GUEST_RES}/microvm.config"
readonly INIT_SCRIPT="${GUEST_RES}/init"
readonly KSRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
readonly ROOTFS_MIB="${LEDGE_ROOTFS_MIB:-32}"

OUT_DIR="${1:-${LEDGE_GUEST_DIR:-${HOME}/.cache/ledge/guest}}"
mkdir -p "${OUT_DIR}"
OUT_DIR="$(cd "${OUT_DIR}" && pwd)"
readonly OUT_DIR
readonly WORK="${OUT_DIR}/build"

# One build at a time per OUT_DIR (tests may call this concurrently).
exec 9>"${OUT_DIR}/.lock"
flock 9

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }

# --- prerequisites -----------------------------------------------------------

# command -> Debian package that provides it
declare -A TOOL_PKG=(
    [gcc]=gcc [make]=make [bc]=bc [bison]=bison [flex]=flex [perl]=perl
    [readelf]=binutils [cpio]=cpio [mkfs.ext4]=e2fsprogs [xz]=xz-utils
    [gzip]=gzip [sha256sum]=coreutils [dpkg-query]=dpkg
)

ensure_prereqs() {
    local missing=() tool
    for tool in "${!TOOL_PKG[@]}"; do
        command -v "${tool}" >/dev/null 2>&1 || missing+=("${TOOL_PKG[${tool}]}")
    done
    [[ -f "${KSRC_TARBALL}" ]] || missing+=(linux-source-6.1)
    [[ -x /bin/busybox ]] && dpkg-query -W busybox-static >/dev/null 2>&1 \
        || missing+=(busybox-static)
    [[ -f /usr/include/libelf.h ]] || missing+=(libelf-dev)
    [[ -f /usr/include/openssl/opensslv.h ]] || missing+=(libssl-dev)
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    log "missing packages: ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 \
        || die "apt-get not found; install these by hand: ${missing[*]}"
    ((EUID == 0)) || die "need root to apt-get install: ${missing[*]}"
    log "running apt-get update and install"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
    [[ -f "${KSRC_TARBALL}" ]] || die "${KSRC_TARBALL} still missing after install"
}

pkg_version() {
    dpkg-query -W -f '${Version}' "$1" 2>/dev/null || die "package $1 is not installed"
}

[[ -f "${FRAGMENT}" ]] || die "kernel config fragment not found: ${FRAGMENT}"
[[ -f "${INIT_SCRIPT}" ]] || die "guest init script not found: ${INIT_SCRIPT}"

# Fast path first: without touching apt, see whether the cached outputs match.
input_hash() {
    {
        printf 'linux-source-6.1 %s\n' "$(pkg_version linux-source-6.1)"
        printf 'busybox-static %s\n' "$(pkg_version busybox-static)"
        printf 'rootfs-mib %s\n' "${ROOTFS_MIB}"
        sha256sum "${FRAGMENT}" "${INIT_SCRIPT}" "${SCRIPT_PATH}" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
}

readonly ARTIFACTS=(vmlinux bzImage initramfs.cpio.gz rootfs.ext4 manifest.txt)

outputs_current() {
    local hash="$1" f
    for f in "${ARTIFACTS[@]}"; do
        [[ -s "${OUT_DIR}/${f}" ]] || return 1
    done
    grep -qx "input_hash=${hash}" "${OUT_DIR}/manifest.txt"
}

print_result() {
    local f
    echo "guest artifacts in ${OUT_DIR}:"
    for f in "${ARTIFACTS[@]}"; do
        printf '  %-18s %s\n' "${f}" "$(du -h "${OUT_DIR}/${f}" | cut -f1)"
    done
    sed 's/^/  /' "${OUT_DIR}/manifest.txt"
}

if dpkg-query -W linux-source-6.1 busybox-static >/dev/null 2>&1; then
    HASH="$(input_hash)"
    if outputs_current "${HASH}"; then
        log "up to date (input hash ${HASH:0:16})"
        print_result
        exit 0
    fi
fi

ensure_prereqs
HASH="$(input_hash)"
readonly HASH
START=${SECONDS}

# --- kernel ------------------------------------------------------------------

KVER_PKG="$(pkg_version linux-source-6.1)"
readonly KVER_PKG
readonly KSRC="${WORK}/linux-source-6.1"
readonly KOBJ="${WORK}/kobj"
readonly KLOG="${WORK}/kernel-build.log"
mkdir -p "${WORK}" "${KOBJ}"

if [[ ! -f "${KSRC}/.ledge-extracted" ]] || [[ "$(cat "${KSRC}/.ledge-extracted")" != "${KVER_PKG}" ]]; then
    log "extracting ${KSRC_TARBALL} (${KVER_PKG})"
    rm -rf "${KSRC}" "${KOBJ}"
    mkdir -p "${KOBJ}"
    tar -C "${WORK}" -xf "${KSRC_TARBALL}"
    [[ -d "${KSRC}" ]] || die "tarball did not contain linux-source-6.1/"
    printf '%s\n' "${KVER_PKG}" >"${KSRC}/.ledge-extracted"
fi

kmake() {
    make -C "${KSRC}" O="${KOBJ}" ARCH=x86_64 "$@"
}

log "configuring: tinyconfig + $(basename "${FRAGMENT}")"
{
    kmake tinyconfig
    "${KSRC}/scripts/kconfig/merge_config.sh" -m -O "${KOBJ}" "${KOBJ}/.config" "${FRAGMENT}"
    kmake olddefconfig
} >"${KLOG}" 2>&1 || { tail -n 30 "${KLOG}" >&2; die "kernel configuration failed (log: ${KLOG})"; }

# Every line of the fragment must hold in the final .config.
check_config() {
    local line sym want have bad=()
    while IFS= read -r line; do
        if [[ "${line}" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym="${BASH_REMATCH[1]}" want="${BASH_REMATCH[2]}"
            have="$(grep -E "^${sym}=" "${KOBJ}/.config" | cut -d= -f2- || true)"
            [[ "${have}" == "${want}" ]] || bad+=("${sym}=${want} (got: ${have:-not set})")
        elif [[ "${line}" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym="${BASH_REMATCH[1]}"
            if grep -qE "^${sym}=" "${KOBJ}/.config"; then
                bad+=("${sym} must be off (got: $(grep -E "^${sym}=" "${KOBJ}/.config"))")
            fi
        fi
    done <"${FRAGMENT}"
    if ((${#bad[@]} > 0)); then
        printf 'build-guest: error: kernel config options dropped by Kconfig:\n' >&2
        printf '  %s\n' "${bad[@]}" >&2
        die "fix the dependencies in ${FRAGMENT}"
    fi
}
check_config

log "building kernel with -j$(nproc) (log: ${KLOG})"
kmake -j"$(nproc)" vmlinux bzImage >>"${KLOG}" 2>&1 \
    || { tail -n 40 "${KLOG}" >&2; die "kernel build failed (log: ${KLOG})"; }
KREL="$(kmake -s kernelrelease 2>/dev/null)"
readonly KREL

if ! readelf -n "${KOBJ}/vmlinux" | grep -q 'Xen.*0x00000012'; then
    # 0x12 = XEN_ELFNOTE_PHYS32_ENTRY, the PVH entry point.
    readelf -n "${KOBJ}/vmlinux" >&2 || true
    die "vmlinux has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY)"
fi

# --- userspace ---------------------------------------------------------------

readonly ROOT="${WORK}/rootfs"
log "assembling busybox userspace"
rm -rf "${ROOT}"
mkdir -p "${ROOT}"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,mnt,var}
chmod 1777 "${ROOT}/tmp"
cp /bin/busybox "${ROOT}/bin/busybox"
while IFS= read -r applet; do
    [[ "${applet}" == bin/busybox || -e "${ROOT}/${applet}" ]] && continue
    ln -s /bin/busybox "${ROOT}/${applet}"
done < <(/bin/busybox --list-full)
install -m 0755 "${INIT_SCRIPT}" "${ROOT}/init"
ln -sf /init "${ROOT}/sbin/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"${ROOT}/etc/passwd"
printf 'root:x:0:\n' >"${ROOT}/etc/group"
printf 'ledge-guest\n' >"${ROOT}/etc/hostname"

# The initramfs is written with the kernel's own gen_init_cpio so that the
# /dev/console node (needed before devtmpfs is mounted) exists without mknod.
readonly GEN_CPIO="${WORK}/gen_init_cpio"
cc -O2 -o "${GEN_CPIO}" "${KSRC}/usr/gen_init_cpio.c"
readonly CPIO_LIST="${WORK}/initramfs.list"
{
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    (cd "${ROOT}" && find . -mindepth 1 | LC_ALL=C sort) | while IFS= read -r p; do
        p="${p#.}"
        if [[ -L "${ROOT}${p}" ]]; then
            echo "slink ${p} $(readlink "${ROOT}${p}") 0777 0 0"
        elif [[ -d "${ROOT}${p}" ]]; then
            echo "dir ${p} $(stat -c %a "${ROOT}${p}") 0 0"
        else
            echo "file ${p} ${ROOT}${p} $(stat -c %a "${ROOT}${p}") 0 0"
        fi
    done
} >"${CPIO_LIST}"
# /dev must exist before the nodes in it: gen_init_cpio writes in list order.
sed -i '1i dir /dev 0755 0 0' "${CPIO_LIST}"
sed -i '0,/^dir \/dev 0755 0 0$/!{/^dir \/dev [0-7]* 0 0$/d}' "${CPIO_LIST}"

"${GEN_CPIO}" "${CPIO_LIST}" | gzip -9n >"${WORK}/initramfs.cpio.gz.tmp"

rm -f "${WORK}/rootfs.ext4.tmp"
mkfs.ext4 -q -F -L ledge-root -E root_owner=0:0 -d "${ROOT}" \
    "${WORK}/rootfs.ext4.tmp" "${ROOTFS_MIB}M" >/dev/null

# --- publish -----------------------------------------------------------------

install -m 0644 "${KOBJ}/vmlinux" "${OUT_DIR}/vmlinux"
install -m 0644 "${KOBJ}/arch/x86/boot/bzImage" "${OUT_DIR}/bzImage"
mv -f "${WORK}/initramfs.cpio.gz.tmp" "${OUT_DIR}/initramfs.cpio.gz"
mv -f "${WORK}/rootfs.ext4.tmp" "${OUT_DIR}/rootfs.ext4"
cp "${KOBJ}/.config" "${OUT_DIR}/kernel.config"
cat >"${OUT_DIR}/manifest.txt.tmp" <<EOF
input_hash=${HASH}
kernel_release=${KREL}
linux_source_6_1=${KVER_PKG}
busybox_static=$(pkg_version busybox-static)
rootfs_mib=${ROOTFS_MIB}
EOF
mv -f "${OUT_DIR}/manifest.txt.tmp" "${OUT_DIR}/manifest.txt"
log "built in $((SECONDS - START)) s"
print_result
