"""What fresh host memory costs on this machine: pinned allocations (torch's caching host
allocator, new blocks each time) per MiB, and the first touch of fresh pageable memory.

    python benchmarks/bench_pinned_alloc.py    (needs CUDA)

The streaming tier reuses two pinned staging buffers instead of pinning a buffer per copy
because of these figures (H200 host: 0.6-0.9 ms per MiB pinned, 0.44 ms per MiB touched).
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    for mb in (1, 4, 16):
        keep = []
        t = time.perf_counter()
        for _ in range(64 // mb * 4):  # kept alive: every allocation is a new block
            keep.append(torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True))
        dt = time.perf_counter() - t
        print(f"pinned alloc fresh {mb} MiB blocks: {dt / len(keep) * 1e3:.2f} ms each, "
              f"{dt / (len(keep) * mb) * 1e3:.2f} ms/MiB")
        del keep
    keep = []
    t = time.perf_counter()
    for _ in range(64):
        a = torch.empty(4 << 20, dtype=torch.uint8)
        a.fill_(1)
        keep.append(a)
    dt = time.perf_counter() - t
    print(f"pageable alloc+touch 4 MiB: {dt / 64 * 1e3:.2f} ms each")


if __name__ == "__main__":
    main()
