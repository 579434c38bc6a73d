#!/usr/bin/env python3
"""Drives a full VM lifecycle on Ledge's API socket with a third-party Firecracker client.

The client is `firecracker.api.Api` from the PyPI package firecracker-python 0.0.5, used as it
is: this script only calls it. Run by tests/api_clients.rs inside a virtualenv:

    fc_lifecycle.py SOCKET KERNEL

KERNEL is the probe guest exported with `ledge export-probe`; it boots with "probe=count".
Prints one line per step and "fc_lifecycle: ok" at the end; exits 1 with the reason on failure.
"""
import sys
import time

from firecracker.api import Api
from firecracker.exceptions import APIError


def step(name, value=None):
    print(f"fc_lifecycle: {name}" + ("" if value is None else f": {value}"), flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def state(api):
    return api.describe.get().json()["state"]


def main(socket_path, kernel):
    api = Api(socket_path)
    try:
        info = api.describe.get().json()
        step("describe", info)
        expect(info["app_name"] == "Ledge", f"app_name {info['app_name']!r}")
        expect(info["state"] == "Not started", f"state {info['state']!r}")
        version = api.version.get().json()
        step("version", version)
        expect("firecracker_version" in version, "no firecracker_version")

        api.machine_config.put(vcpu_count=1, mem_size_mib=128)
        mc = api.machine_config.get().json()
        step("machine-config", mc)
        expect(mc["vcpu_count"] == 1 and mc["mem_size_mib"] == 128, f"machine-config {mc}")

        api.boot.put(kernel_image_path=kernel, boot_args="probe=count")
        config = api.vm_config.get().json()
        step("vm/config", config)
        expect(config["boot-source"]["kernel_image_path"] == kernel, "boot-source not kept")

        # A field Ledge does not support is refused, naming it.
        try:
            api.machine_config.put(vcpu_count=1, mem_size_mib=128, smt=True)
            raise AssertionError("smt=true was accepted")
        except APIError as e:
            step("refused smt", e.message)
            expect("smt" in e.message, e.message)

        api.actions.put(action_type="InstanceStart")
        expect(state(api) == "Running", "not Running after InstanceStart")
        step("started")

        # Pre-boot only calls now fail, naming the state.
        try:
            api.machine_config.patch(vcpu_count=2)
            raise AssertionError("machine-config changed after boot")
        except APIError as e:
            step("refused after boot", e.message)

        time.sleep(0.5)
        api.vm.patch(state="Paused")
        expect(state(api) == "Paused", "not Paused")
        step("paused")
        time.sleep(0.5)
        api.vm.patch(state="Resumed")
        expect(state(api) == "Running", "not Running after resume")
        step("resumed")
        time.sleep(0.5)

        api.actions.put(action_type="SendCtrlAltDel")
        step("sent Ctrl-Alt-Del")
    finally:
        api.close()
    step("ok")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: fc_lifecycle.py SOCKET KERNEL")
    try:
        main(sys.argv[1], sys.argv[2])
    except (APIError, AssertionError, KeyError, ValueError) as e:
        print(f"fc_lifecycle: FAILED: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
