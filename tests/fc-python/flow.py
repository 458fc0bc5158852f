"""Drives dormouse's Firecracker API with a Firecracker client from PyPI
(hysn-firecracker-python's `firecracker.api.Api`, installed by
deploy/install-fc-python-client.sh). Run by tests/tests/firecracker.rs in two phases:

  flow.py boot SOCK KERNEL SNAPSHOT_PATH MEM_FILE_PATH   configure, start, pause, snapshot
  flow.py load SOCK SNAPSHOT_PATH MEM_FILE_PATH          load with resume_vm, check Running

Prints "OK <phase>" on success; anything else exits non-zero with the reason.
"""

import sys

from firecracker.api import Api
from firecracker.exceptions import APIError


def check(condition, what):
    if not condition:
        print(f"FAIL: {what}")
        sys.exit(1)


def state(api):
    return api.describe.get().json()["state"]


def boot(api, kernel, snapshot_path, mem_file_path):
    check(state(api) == "Not started", "a fresh VMM is not started")
    api.boot.put(kernel_image_path=kernel, boot_args="console=ttyS0")
    api.machine_config.put(vcpu_count=1, mem_size_mib=32, smt=False)
    try:
        api.machine_config.put(vcpu_count=1, mem_size_mib=32, smt=True)
        check(False, "smt: true was accepted")
    except APIError as e:
        check("not supported by dormouse" in str(e), f"smt refused without the reason: {e}")
    config = api.vm_config.get().json()
    check(config["machine-config"]["mem_size_mib"] == 32, f"GET /vm/config: {config}")
    api.actions.put(action_type="InstanceStart")
    check(state(api) == "Running", "running after InstanceStart")
    api.vm.patch(state="Paused")
    check(state(api) == "Paused", "paused after PATCH /vm")
    api.create_snapshot.put(
        snapshot_type="Full", snapshot_path=snapshot_path, mem_file_path=mem_file_path
    )


def load(api, snapshot_path, mem_file_path):
    api.load_snapshot.put(
        snapshot_path=snapshot_path,
        mem_backend={"backend_type": "File", "backend_path": mem_file_path},
        resume_vm=True,
    )
    check(state(api) == "Running", "running after snapshot/load with resume_vm")
    version = api.version.get().json()["firecracker_version"]
    check(version.startswith("1."), f"version {version}")


def main():
    phase, sock = sys.argv[1], sys.argv[2]
    api = Api(sock, timeout=60)
    try:
        if phase == "boot":
            boot(api, *sys.argv[3:6])
        elif phase == "load":
            load(api, *sys.argv[3:5])
        else:
            check(False, f"unknown phase {phase}")
    finally:
        api.close()
    print(f"OK {phase}")


if __name__ == "__main__":
    main()
