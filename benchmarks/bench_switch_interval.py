"""How long a thread that keeps giving up the interpreter (as the engine thread does at
each device sync) waits to get it back from a thread running Python, per switch interval.

    python benchmarks/bench_switch_interval.py

The main thread runs 200 iterations of a little Python work and a 0.2 ms sleep (the
interpreter released, as in a device sync); a second thread runs a pure-Python loop. The
engine sets the interval to 0.1 ms when it has a disk tier (engine.SWITCH_INTERVAL_S),
whose writer and read-ahead threads run Python.
"""

from __future__ import annotations

import sys
import threading
import time


def main_work(n: int = 200) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        [i * 2 for i in range(500)]
        time.sleep(0.0002)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    print(f"alone: {main_work():.3f} ms per iteration")
    before = sys.getswitchinterval()
    for interval in (0.005, 0.001, 0.0005, 0.0001):
        sys.setswitchinterval(interval)
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                x = 0
                for i in range(1000):
                    x += i

        t = threading.Thread(target=busy)
        t.start()
        time.sleep(0.02)
        ms = main_work()
        stop.set()
        t.join()
        print(f"switch interval {interval * 1e3:.1f} ms, a Python thread busy: {ms:.3f} ms "
              f"per iteration")
    sys.setswitchinterval(before)


if __name__ == "__main__":
    main()
