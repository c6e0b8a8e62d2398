"""Benchmark: xl config files parsed per second, xenlab vs Debian's libxlutil 4.17.

Peer: libxlutil's ``xlu_cfg_readdata`` (flex + bison, C), called in this
process through the ctypes shim in tests/oracle/libxlu.py.
Input: the project's examples/*.cfg and, when present, ../shared/data/xlcfg/*
(real configs from Xen, libvirt, buildroot and xen-troops), each parsed whole.

Two peer figures are printed:
  * ``libxlutil (values)``: readdata plus reading every setting's value back
    out of libxlutil's structures, which is what a Python program gets from
    the C parser and what xenlab's ``parse`` returns.  This is the headline.
  * ``libxlutil (C only)``: init + readdata + destroy, nothing read back: the
    C parser's raw speed with only the ctypes call overhead around it.

X in the last line is xenlab's configs/s divided by the headline peer's
(above 1: xenlab is faster).  Warm-up once, then best of N rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.oracle import libxlu as oracle  # noqa: E402

from xenlab.config import parse  # noqa: E402


def corpus() -> list[bytes]:
    files = sorted((REPO / "examples").glob("*.cfg"))
    shared = REPO.parent / "shared" / "data" / "xlcfg"
    if shared.is_dir():
        files += sorted(shared.iterdir())
    return [f.read_bytes() for f in files]


def best_rate(fn: Callable[[bytes], object], data: list[bytes], rounds: int, reps: int) -> float:
    """Return the best configs/second over ``rounds`` runs of ``reps`` passes."""
    for d in data:  # warm-up
        fn(d)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            for d in data:
                fn(d)
        best = min(best, time.perf_counter() - start)
    return len(data) * reps / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    lib = oracle.load()
    xlu = lib.xlu
    devnull = lib.libc.fopen(b"/dev/null", b"w")
    lib.libc.fopen.restype = ctypes.c_void_p
    devnull = lib.libc.fopen(b"/dev/null", b"w")

    def c_only(data: bytes) -> None:
        cfg = xlu.xlu_cfg_init(devnull, b"bench")
        xlu.xlu_cfg_readdata(cfg, data, len(data))
        xlu.xlu_cfg_destroy(cfg)

    def c_values(data: bytes) -> list[tuple[str, oracle.Value]]:
        cfg = xlu.xlu_cfg_init(devnull, b"bench")
        try:
            xlu.xlu_cfg_readdata(cfg, data, len(data))
            out = []
            node = cfg.contents.settings
            while node:
                s = node.contents
                out.append((oracle._cstr(s.name), oracle._walk_value(s.value.contents)))
                node = s.next
            return out
        finally:
            xlu.xlu_cfg_destroy(cfg)

    def ours(data: bytes) -> object:
        return parse(data).settings

    data = corpus()
    # Both parsers must agree on what they are timed on.
    for d in data:
        assert lib.parse_cfg(d).ok, "corpus file refused by libxlutil"
        ours(d)

    size = sum(len(d) for d in data)
    print(f"corpus: {len(data)} files, {size} bytes; best of {args.rounds} x {args.reps} passes")
    rates = {
        "xenlab": best_rate(ours, data, args.rounds, args.reps),
        "libxlutil (values)": best_rate(c_values, data, args.rounds, args.reps),
        "libxlutil (C only)": best_rate(c_only, data, args.rounds, args.reps),
    }
    print(f"{'parser':<20} {'configs/s':>12} {'xenlab / this':>14}")
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>12.0f} {rates['xenlab'] / rate:>14.2f}")
    print(f"config_parse ratio={rates['xenlab'] / rates['libxlutil (values)']:.2f}")


if __name__ == "__main__":
    main()
