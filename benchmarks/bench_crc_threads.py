"""CRC-32 (the store's block checksum) over 48 KiB blocks: one thread against 8, on blocks in
process memory and on blocks of a freshly mapped file (page cache warm: the first touch of
each page maps it, as a new process's first reads of the LMDB map do). The interpreter's
switch interval is the engine's (0.1 ms).

    python benchmarks/bench_crc_threads.py [--mb 192]
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

BLOCK = 48 << 10


def crc_all(buf, offsets) -> None:
    for o in offsets:
        zlib.crc32(buf[o:o + BLOCK])


def timed(buf, n: int, threads: int) -> float:
    offs = [i * BLOCK for i in range(n)]
    parts = [offs[i::threads] for i in range(threads)]
    t = time.perf_counter()
    if threads == 1:
        crc_all(buf, offs)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda p: crc_all(buf, p), parts))
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=192)
    args = ap.parse_args()
    sys.setswitchinterval(1e-4)  # as the engine sets it with a disk tier
    n = (args.mb << 20) // BLOCK
    data = os.urandom(n * BLOCK)
    mem = memoryview(data)
    print(f"# {os.cpu_count()} CPUs; {n} blocks of 48 KiB; us per block")
    for threads in (1, 8):
        print(f"in memory, {threads} thread(s): {timed(mem, n, threads):.1f}")
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/tmp")) as f:
        f.write(data)
        f.flush()
        for threads in (1, 8):
            with open(f.name, "rb") as g:  # page cache warm, a fresh mapping each time
                mm = mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ)
                buf = memoryview(mm)
                first = timed(buf, n, threads)
                again = timed(buf, n, threads)
                buf.release()
                mm.close()
            print(f"fresh mapping, {threads} thread(s): first touch {first:.1f}, "
                  f"mapped {again:.1f}")


if __name__ == "__main__":
    main()
