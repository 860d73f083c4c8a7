"""z3 vs big-M MILP (HiGHS) on small ReLU heads: which decides more, and how fast.

    .venv/bin/python benchmarks/exact_heads.py [--per-size 10] [--timeout 10]

Instances: random MLPs (torch's default init, seeded) of the sizes below, a random centre,
the property "the centre's top logit stays above the runner-up" on an L-inf box whose radius
is 1.5x the largest one CROWN proves (found by bisection), so CROWN alone is undecided and
the exact methods have work to do. Both get the same CROWN pre-activation bounds and the
same time limit. Writes benchmarks/results/exact_heads.json (with the command).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from certood.verifiers.milp import decide_relu_head_milp
from certood.verifiers.reference import Region, crown_bounds, evaluate, mlp_layers
from certood.verifiers.z3_exact import decide_relu_head, preactivation_bounds

SIZES = [(8, 16, 16, 2), (16, 32, 32, 2), (16, 32, 32, 4)]
RESULTS = Path(__file__).resolve().parent / "results" / "exact_heads.json"


def instance(sizes, seed):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    layers = mlp_layers(nn.Sequential(*mods))
    x = torch.randn(1, sizes[0], dtype=torch.float64)
    out = evaluate(layers, x)[0]
    top = out.topk(2).indices
    c = torch.zeros(sizes[-1], dtype=torch.float64)
    c[top[0]], c[top[1]] = 1.0, -1.0

    def crown_proves(eps):
        lo, _ = crown_bounds(layers + [("linear", c.reshape(1, -1), torch.zeros(1, dtype=torch.float64))],
                             Region(x, eps))
        return float(lo[0, 0]) > 0

    lo, hi = 0.0, 1.0
    while crown_proves(hi):
        hi *= 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if crown_proves(mid) else (lo, mid)
    return layers, x[0], c, 1.5 * lo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-size", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for sizes in SIZES:
        for seed in range(args.per_size):
            layers, x, c, eps = instance(sizes, seed)
            pre = preactivation_bounds(layers, x - eps, x + eps)
            row = {"sizes": list(sizes), "seed": seed, "eps": eps}
            for name, fn in (("z3", decide_relu_head), ("milp", decide_relu_head_milp)):
                d = fn(layers, x - eps, x + eps, c, timeout_s=args.timeout, pre_bounds=pre)
                row[name] = {"status": d.status, "seconds": round(d.seconds, 3), "reason": d.reason}
                row["n_unstable"] = d.n_unstable
            rows.append(row)
            print(f"{sizes} seed {seed}: {row['n_unstable']} unstable, z3 {row['z3']['status']} "
                  f"({row['z3']['seconds']}s), milp {row['milp']['status']} ({row['milp']['seconds']}s)",
                  file=sys.stderr)
    summary = {}
    for sizes in SIZES:
        sub = [r for r in rows if r["sizes"] == list(sizes)]
        entry = {"instances": len(sub), "median_unstable": statistics.median(r["n_unstable"] for r in sub)}
        for name in ("z3", "milp"):
            decided = [r for r in sub if r[name]["status"] in ("proved", "counterexample")]
            entry[name] = {"decided": len(decided),
                           "proved": sum(r[name]["status"] == "proved" for r in sub),
                           "counterexample": sum(r[name]["status"] == "counterexample" for r in sub),
                           "median_seconds_decided": statistics.median(r[name]["seconds"] for r in decided)
                           if decided else None}
        entry["contradictions"] = sum({r["z3"]["status"], r["milp"]["status"]} == {"proved", "counterexample"}
                                      for r in sub)
        summary["-".join(map(str, sizes))] = entry
    out = {"command": "python benchmarks/exact_heads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "timeout_s": args.timeout, "machine": f"{platform.machine()}, {platform.python_version()}, 1 thread",
           "date": time.strftime("%Y-%m-%d"), "summary": summary, "instances": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
