#!/usr/bin/env bash
# xenlab's one entry point for a fresh machine.
#   ./dev.sh run    set up, then run the main job (check and show the example configs,
#                   build and scan an early-microcode initrd, boot a guest and
#                   snapshot it, boot a VGA BIOS as a guest's display, compare
#                   schedulers in the simulator)
#   ./dev.sh test   set up, then run ruff, mypy and the test suite
#   ./dev.sh crash  set up, then SIGKILL every verb at every fault point (the default
#                   tests kill at a few points per verb)
#   ./dev.sh bench  set up, then run every benchmark under bench/
# Setup is idempotent: system packages via apt-get (when root and missing),
# a venv in .venv via pip.
set -euo pipefail
cd "$(dirname "$0")"

# System packages the project uses:
#   test oracles: apt-get/dpkg fetch libxlutil and Xen 4.17; QEMU boots that Xen to
#   check early microcode; iucode-tool is the microcode peer;
#   real parts for tests: cpio, busybox-static, initramfs-tools-core (mkinitramfs,
#   lsinitramfs, unmkinitramfs) and the compressors initrds use;
#   the toolstack: QEMU and qemu-img run guests; qemu-guest-agent goes into the
#   guest image (xenlab image build) with its libraries;
#   hotplug: iproute2 (`ip`, the tests' oracle for the taps and bridges that
#   xenlab.hotplug makes through pyroute2);
#   VGA BIOSes: seabios (the firmware QEMU boots, and its vgabios-*.bin that
#   `xenlab rom boot` runs as the guest's primary display).
APT_PACKAGES=(ca-certificates qemu-system-x86 qemu-utils seabios qemu-guest-agent cpio busybox-static iucode-tool initramfs-tools-core zstd lz4 xz-utils bzip2 lzma iproute2)

setup() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
      dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
  fi
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    touch .venv/.installed
  fi
}

cmd="${1:-run}"
case "$cmd" in
  run)
    setup
    .venv/bin/xenlab config check examples/*.cfg
    .venv/bin/xenlab config show examples/hvm-vnuma.cfg
    # Microcode: an early cpio in front of an initrd, then the loaders' view of it.
    demo="$(mktemp -d)"
    trap 'rm -rf "$demo"' EXIT
    .venv/bin/python examples/ucode/make-inputs.py "$demo"
    .venv/bin/xenlab ucode build-early "$demo/initrd.new" --from "$demo/intel.bin" \
        --from "$demo/amd.bin" --append-initrd "$demo/initrd.img" --check
    .venv/bin/xenlab ucode scan "$demo/initrd.new"
    .venv/bin/xenlab ucode select --cpu 0x906a4,0x80 "$demo/initrd.new"
    .venv/bin/xenlab ucode xen-cmdline "$demo/initrd.new" --cpu 0x906a4,0x80
    # The toolstack: boot the tiny guest, snapshot it, change it, revert, show.
    export XENLAB_STATE_DIR="$demo/state"
    x=.venv/bin/xenlab
    $x vm create examples/vm/tiny.cfg \
        "disk=['format=qcow2,vdev=xvda,access=rw,target=$demo/tiny.qcow2']" \
        'extra="xenlab.mkfs=1"' --create-disks 64M --wait 120
    $x vm exec tiny -- sh -c 'echo A > /mnt/disk/marker; sync; cat /mnt/disk/marker'
    $x vm snapshot-create tiny s1 --description "marker A"
    $x vm exec tiny -- sh -c 'echo B > /mnt/disk/marker; sync; cat /mnt/disk/marker'
    $x vm snapshot-revert tiny s1
    echo "after reverting to s1 the guest reads: $($x vm exec tiny -- cat /mnt/disk/marker)"
    $x vm snapshot-list tiny
    $x vm list
    $x vm destroy tiny
    $x vm undefine tiny
    # VGA BIOS: SeaBIOS's stdvga BIOS inspected, then run as a guest's primary display.
    $x rom inspect /usr/share/seabios/vgabios-stdvga.bin
    $x rom boot /usr/share/seabios/vgabios-stdvga.bin --check --out "$demo/rom"
    # The simulator: a real-time guest next to a misbehaving one under legacy SEDF,
    # SEDF with CBS and RTDS (tables; JSON, CSV and PNG plots in $demo/sim).
    $x sim compare examples/sim/isolation.toml --out "$demo/sim" --check
    ;;
  test)
    setup
    .venv/bin/ruff check src tests bench examples
    .venv/bin/mypy
    .venv/bin/lint-imports --no-cache
    shift || true
    # Two workers (XENLAB_TEST_WORKERS to change; 0 runs in this process): most of the
    # time is TCG guests, one CPU each. A file stays on one worker, so its module
    # fixtures (a booted guest) are made once.
    .venv/bin/pytest -q -n "${XENLAB_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  crash)
    # Every fault point of every verb (the default suite kills at a few per verb).
    setup
    shift || true
    XENLAB_CRASH_ALL=1 .venv/bin/pytest -q tests/vm/test_crash_points.py \
        tests/vm/test_mirror_crash.py "$@"
    ;;
  bench)
    setup
    for b in bench/[!_]*.py; do .venv/bin/python "$b"; done
    ;;
  *)
    echo "usage: $0 run|test|crash|bench" >&2
    exit 2
    ;;
esac
