"""Long-context retrieval: pass-key and needle-in-a-haystack, ReAttention vs full attention.

Pass-key (as in DESIGN.md): "The pass key is NNNNN. Remember it. NNNNN is the pass key."
inside repeated filler at a given depth; the prompt ends "What is the pass key? The pass
key is". Needle: a "special magic number for <city>" sentence inside varied filler
sentences. A trial passes when the greedy continuation (8 tokens) contains the number.
Depths are spread evenly over (0, 1); each (length, depth) point gets --trials keys.

  python benchmarks/niah.py --lengths 16K 32K 64K --trials 10 --device cpu
  python benchmarks/niah.py --lengths 128K 1M --device cuda --png niah.png

Full attention beyond the trained length is run with --context-length raised (plain RoPE
extrapolation), the baseline ReAttention must beat.
"""

from __future__ import annotations

import argparse
import json
import random
import time

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
VARIED = [
    "The river bends twice before it reaches the old mill.",
    "Most of the town's bakers start work before dawn.",
    "A committee met on Tuesday to discuss the new library hours.",
    "The trail up the hill is steep but well marked.",
    "Several species of finch nest in the hedges near the school.",
    "Rain is expected over the weekend, followed by a cold spell.",
    "The museum's east wing reopened after a long renovation.",
    "Her grandfather kept bees and sold honey at the market.",
    "The ferry leaves every forty minutes in the summer season.",
    "An old map of the harbour hangs in the station hall.",
    "The orchestra rehearsed the second movement three times.",
    "Farmers in the valley grow barley, potatoes and beans.",
    "The bridge was painted red to match the lighthouse.",
    "Children collected shells along the northern beach.",
    "The council approved a plan for more cycle lanes.",
    "A small café on the corner serves soup at lunchtime.",
]
CITIES = ["Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quito", "Perth", "Tbilisi", "Dakar",
          "Riga", "Montreal", "Seoul"]


def parse_len(s: str) -> int:
    s = s.upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    return int(float(s.rstrip("KM")) * mult)


def build_prompt(tok, task: str, length: int, depth: float, rng: random.Random
                 ) -> tuple[list[int], str]:
    """Token ids of a prompt of about `length` tokens with the needle at `depth`."""
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        question = " What is the pass key? The pass key is"
        unit = tok.encode(FILLER)
        filler_at = lambda n: (unit * (n // len(unit) + 1))[:n]  # noqa: E731
    else:
        city = rng.choice(CITIES)
        key = str(rng.randint(1000000, 9999999))
        needle = f" The special magic number for {city} is {key}. "
        question = (f" What is the special magic number for {city}? "
                    f"The special magic number for {city} is")
        sents = VARIED[:]
        rng.shuffle(sents)
        unit = tok.encode(" ".join(sents * 4) + " ")

        def filler_at(n: int) -> list[int]:
            return (unit * (n // len(unit) + 1))[:n]
    nid, qid = tok.encode(needle), tok.encode(question)
    body = max(length - len(nid) - len(qid), 0)
    before = int(body * depth)
    ids = filler_at(before) + nid + filler_at(body - before)[::1] + qid
    return ids, key


def run(engine, tok, task: str, length: int, depths: list[float], trials: int, seed: int
        ) -> list[dict]:
    rows = []
    for d in depths:
        hits = 0
        for t in range(trials):
            rng = random.Random(f"{seed}-{task}-{length}-{d}-{t}")
            ids, key = build_prompt(tok, task, length, d, rng)
            out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 8,
                                                                  "temperature": 0})
            hits += key in out["text"]
        rows.append({"task": task, "length": length, "depth": d, "hits": hits,
                     "trials": trials})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def heatmap(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, mode) in zip(axes[0], panels):
        sub = [r for r in rows if r["task"] == task and r["mode"] == mode]
        lengths = sorted({r["length"] for r in sub})
        depths = sorted({r["depth"] for r in sub})
        grid = [[next((r["hits"] / r["trials"] for r in sub
                       if r["length"] == L and r["depth"] == d), float("nan"))
                 for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task}, {mode}")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lengths", nargs="+", default=["16K", "32K", "64K"])
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--trials", type=int, default=10, help="keys per (length, depth)")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "needle"])
    ap.add_argument("--modes", nargs="+", default=["full", "reattn"])
    ap.add_argument("--full-lengths", nargs="+", default=["4K", "16K", "32K"],
                    help="lengths for full attention (the within-window baseline and beyond)")
    ap.add_argument("--long-from", default="256K")
    ap.add_argument("--long-trials", type=int, default=2,
                    help="keys per point at lengths >= --long-from (time)")
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--reattn-chunk-size", type=int, default=64)
    ap.add_argument("--reattn-topk", type=int, default=None)
    ap.add_argument("--reattn-local", type=int, default=None)
    ap.add_argument("--reattn-summary", default="minmax")
    ap.add_argument("--reattn-combine", default="max")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()

    from sglang_reattn import Engine

    lengths = [parse_len(x) for x in args.lengths]
    full_lengths = [parse_len(x) for x in args.full_lengths]
    depths = [(i + 0.5) / args.depths for i in range(args.depths)]
    longest = max(lengths + full_lengths) + 64
    rows: list[dict] = []
    t0 = time.time()
    for mode in args.modes:
        mode_lengths = lengths if mode == "reattn" else full_lengths
        if not mode_lengths:
            continue
        opts = dict(device=args.device, dtype=args.dtype, log_level="warning",
                    chunked_prefill_size=args.chunked_prefill_size,
                    max_total_tokens=longest + 8192, context_length=longest)
        if mode == "full":
            opts["disable_reattn"] = True
        else:
            opts.update(reattn_chunk_size=args.reattn_chunk_size, reattn_topk=args.reattn_topk,
                        reattn_local=args.reattn_local, reattn_summary=args.reattn_summary,
                        reattn_combine=args.reattn_combine)
        engine = Engine(args.model_path, **opts)
        for task in args.tasks:
            for L in mode_lengths:
                trials = args.long_trials if L >= parse_len(args.long_from) else args.trials
                for r in run(engine, engine.tokenizer, task, L, depths, trials, args.seed):
                    r["mode"] = mode
                    r["elapsed_s"] = round(time.time() - t0, 1)
                    rows.append(r)
                if args.json:  # keep what finished even if a later point runs out of time
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
        info = engine.get_server_info().get("reattn")
        engine.shutdown()
        print(f"# {mode} done ({info}) at {time.time() - t0:.0f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.png:
        heatmap(rows, args.png)
    print(f"\n| task | mode | length | accuracy (hits/trials over {args.depths} depths) |")
    print("|---|---|---|---|")
    for task in args.tasks:
        for mode in args.modes:
            for L in sorted(set(lengths + full_lengths)):
                sub = [r for r in rows if r["task"] == task and r["mode"] == mode
                       and r["length"] == L]
                if sub:
                    h, n = sum(r["hits"] for r in sub), sum(r["trials"] for r in sub)
                    print(f"| {task} | {mode} | {L // 1024}K | {h}/{n} = {h / n:.0%} |")


if __name__ == "__main__":
    main()
