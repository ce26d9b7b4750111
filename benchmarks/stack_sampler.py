"""A wall-clock sampling profiler for a short window of a benchmark (a TTFT): a thread
that reads every other thread's Python stack (`sys._current_frames`) every `interval`
seconds and counts, per thread, the function each sample is in (its own time) and the
functions on its stack (time inside). Unlike cProfile it adds no cost per call, so the
window runs at nearly its own speed, and a thread waiting (on the device, a lock, a read
with the interpreter lock released) is sampled where it waits. A thread running C code
that holds the interpreter lock is sampled when it lets go: its time lands on the line
after. Works the same on every Python version (cProfile on 3.12 is one profiler for all
threads at once).

    with StackSampler() as s:
        run()
    s.report(top=30)
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time


def _where(code, line: int | None = None) -> str:
    name = f"{os.path.basename(code.co_filename)}:{code.co_name}"
    return f"{name}:{line}" if line is not None else name


IDLE = ("threading.py:wait:", "queue.py:get:", "thread.py:_worker:", "selectors.py:select:")


FRAME = ("threading.py:", "thread.py:_worker")  # (on every stack of a thread: not listed)


def _idle(where: str) -> bool:
    return where.startswith(IDLE)


class StackSampler:
    def __init__(self, interval: float = 0.0005, depth: int = 60) -> None:
        self.interval, self.depth = interval, depth
        self.own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.inside: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.samples: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wall = 0.0

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                name = names.get(tid, str(tid))
                self.samples[name] += 1
                self.own[name][_where(frame.f_code, frame.f_lineno)] += 1
                seen = set()
                f, d = frame, 0
                while f is not None and d < self.depth:
                    w = _where(f.f_code)
                    if w not in seen:  # (recursion counted once)
                        seen.add(w)
                        self.inside[name][w] += 1
                    f, d = f.f_back, d + 1
            time.sleep(self.interval)

    def __enter__(self) -> StackSampler:
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, self.interval))  # (the sampler gets its turns)
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self.wall = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self.wall
        sys.setswitchinterval(self._switch)

    def report(self, top: int = 30, file=None) -> None:
        """Per thread (not one that only waited): the `top` lines
        by own samples, then the `top` functions by samples inside, each as ms of the
        window (samples x the window's wall time / the thread's samples)."""
        out = file or sys.stdout
        rounds = max(self.samples.values(), default=0)
        print(f"# stack samples over {self.wall * 1e3:.1f} ms (about {rounds} rounds, "
              f"one every {self.wall / max(rounds, 1) * 1e3:.2f} ms)", file=out)
        for name, n in self.samples.most_common():
            waits = sum(k for w, k in self.own[name].items() if _idle(w))
            if n < 0.02 * rounds or waits > 0.98 * n:  # (a thread that only waited)
                continue
            per = self.wall / n * 1e3
            for title, counts in (("own", self.own[name]), ("inside", self.inside[name])):
                print(f"## thread {name}: {n} samples, by {title} time", file=out)
                rows = [(w, k) for w, k in counts.most_common()
                        if not (title == "inside" and w.startswith(FRAME))][:top]
                for where, k in rows:
                    print(f"  {k * per:8.1f} ms {100 * k / n:5.1f}%  {where}", file=out)


def sampled(fn, top: int, interval: float = 0.0005):
    """fn() under a StackSampler; prints its report and returns fn's result."""
    with StackSampler(interval) as s:
        out = fn()
    s.report(top)
    return out
