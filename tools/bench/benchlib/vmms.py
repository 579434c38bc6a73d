"""The VMMs under test and how each one boots the probe guest or serves its API.

Every VMM gets the same guest (the probe ELF that `ledge export-probe` writes; Ledge boots the
identical image built into it), the same vCPU count and memory, and the same devices. Each
`probe_argv` returns the command line that boots it; the caller times it from the fork.
"""
import json
import os
import shutil
import re
import subprocess
import tempfile

from .common import Skip

# The probe's stop sequence is an i8042 reset (Ledge, Firecracker) then a write of 0 to port
# 0xf4: QEMU's isa-debug-exit turns that into exit status (0 << 1) | 1 = 1.
PROBE_START = "LEDGE-PROBE start"
PROBE_MARKER = "LEDGE-PROBE done"


class ProbeConfig:
    """One probe boot: the same for every VMM."""

    def __init__(self, cmdline, vcpus=1, mem_mib=128, disk=None, tap=None, mac=None):
        self.cmdline = cmdline
        self.vcpus = vcpus
        self.mem_mib = mem_mib
        self.disk = disk
        self.tap = tap
        self.mac = mac


class Vmm:
    name = "?"
    # Exit statuses that mean the guest stopped the way it meant to.
    ok_codes = (0,)
    # Which VMM speaks the Firecracker-style HTTP API (API and snapshot scenarios).
    has_http_api = False

    def __init__(self, binary):
        self.binary = binary

    def probe_argv(self, cfg, workdir):
        raise NotImplementedError

    def api_argv(self, sock):
        raise Skip(f"{self.name} has no Firecracker-style HTTP API")

    def version(self):
        try:
            out = subprocess.run([self.binary, "--version"], capture_output=True, text=True,
                                 timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "unknown"


class Ledge(Vmm):
    name = "ledge"
    has_http_api = True

    def probe_argv(self, cfg, workdir):
        argv = [self.binary, "run", "--vcpus", str(cfg.vcpus), "--mem-mib", str(cfg.mem_mib),
                "--console", "stdio", "--cmdline", cfg.cmdline]
        if cfg.disk:
            argv += ["--disk", f"path={cfg.disk},id=bench"]
        if cfg.tap:
            argv += ["--net", f"tap={cfg.tap},mac={cfg.mac}"]
        return argv

    def api_argv(self, sock):
        return [self.binary, "--api-sock", sock, "--id", "bench"]


class Qemu(Vmm):
    """QEMU's microvm machine with KVM, booting the exported probe ELF through PVH."""

    name = "qemu"
    ok_codes = (0, 1)
    # microvm's virtio-mmio windows are 512 bytes from 0xfeb00000, handed out from the top;
    # it does not put them on a PVH kernel's command line, so the probe is told here.
    MMIO_TOP = 0xFEB02E00

    def __init__(self, binary, probe_elf, share_dir=None):
        super().__init__(binary)
        self.probe_elf = probe_elf
        self.share_dir = share_dir

    def machine(self):
        """The -M value. QEMU 7.2 loads a PVH kernel itself, with option ROMs off (the flags the
        issue measured). QEMU 10 leaves that to its pvh.bin option ROM (with ROMs off it falls
        back to SeaBIOS and finds nothing to boot), and its firmware's MP table lists only the
        boot CPU unless ACPI is off, when QEMU writes a full one: so from QEMU 8 the ROMs stay
        on and ACPI goes off (the probe and Linux both use the MP table)."""
        m = re.search(r"version (\d+)", self.version())
        if m and int(m.group(1)) >= 8:
            return "microvm,pit=off,pic=off,isa-serial=on,rtc=off,acpi=off"
        return "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off"

    def base_argv(self, vcpus, mem_mib):
        argv = [self.binary]
        if self.share_dir:
            argv += ["-L", self.share_dir]
        argv += ["-M", self.machine(),
                 "-enable-kvm", "-cpu", "host,-arch-capabilities",
                 "-m", str(mem_mib), "-smp", str(vcpus),
                 "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                 "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4"]
        return argv

    def probe_argv(self, cfg, workdir):
        argv = self.base_argv(cfg.vcpus, cfg.mem_mib)
        cmdline = cfg.cmdline
        slot = self.MMIO_TOP
        if cfg.disk or cfg.tap:
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        if cfg.disk:
            argv += ["-drive", f"id=d0,file={cfg.disk},format=raw,if=none,cache=writeback",
                     "-device", "virtio-blk-device,drive=d0"]
            cmdline += f" virtio_mmio.device=512@{slot:#x}:35"
            slot -= 0x200
        if cfg.tap:
            argv += ["-netdev", f"tap,id=n0,ifname={cfg.tap},script=no,downscript=no",
                     "-device", f"virtio-net-device,netdev=n0,mac={cfg.mac}"]
            cmdline += f" virtio_mmio.device=512@{slot:#x}:36"
        return argv + ["-kernel", self.probe_elf, "-append", cmdline]


class Firecracker(Vmm):
    """Firecracker, booted from a config file (`--no-api`) or driven over its API socket."""

    name = "firecracker"
    has_http_api = True

    def __init__(self, binary, probe_elf):
        super().__init__(binary)
        self.probe_elf = probe_elf

    def config(self, cfg, kernel=None, initrd=None):
        c = {
            "boot-source": {"kernel_image_path": kernel or self.probe_elf,
                            "boot_args": cfg.cmdline},
            "machine-config": {"vcpu_count": cfg.vcpus, "mem_size_mib": cfg.mem_mib},
            "drives": [],
            "network-interfaces": [],
        }
        if initrd:
            c["boot-source"]["initrd_path"] = initrd
        if cfg.disk:
            c["drives"].append({"drive_id": "bench", "path_on_host": cfg.disk,
                                "is_root_device": False, "is_read_only": False})
        if cfg.tap:
            c["network-interfaces"].append({"iface_id": "net0", "host_dev_name": cfg.tap,
                                            "guest_mac": cfg.mac})
        return c

    def probe_argv(self, cfg, workdir):
        # One file per launch: the density scenario starts many at once.
        fd, path = tempfile.mkstemp(prefix="firecracker-", suffix=".json", dir=workdir)
        with os.fdopen(fd, "w") as f:
            json.dump(self.config(cfg), f)
        return [self.binary, "--no-api", "--config-file", path, "--level", "Error"]

    def api_argv(self, sock):
        return [self.binary, "--api-sock", sock, "--level", "Error"]


def find_firecracker():
    """FIRECRACKER_BIN, else `firecracker` on PATH; None if neither."""
    path = os.environ.get("FIRECRACKER_BIN") or shutil.which("firecracker")
    if path and os.access(path, os.X_OK):
        return os.path.abspath(path)
    return None


def discover(ledge_bin, probe_elf, log):
    """The VMMs present here, Ledge first; a note is printed for each one missing."""
    vmms = [Ledge(ledge_bin)]
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        vmms.append(Qemu(qemu, probe_elf))
    else:
        log("note: qemu-system-x86_64 not found (tools/bench/run installs Debian's "
            "qemu-system-x86): QEMU skipped")
    fc = find_firecracker()
    if fc:
        vmms.append(Firecracker(fc, probe_elf))
    else:
        log("note: no firecracker binary (set FIRECRACKER_BIN or put it on PATH): "
            "Firecracker skipped")
    return vmms
