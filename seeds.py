"""
The pipeline over several seeds: each seed's run of almost.py in a folder of its own, then every verdict of the
report tabulated: its figure on each seed, the mean and range over seeds, and on how many seeds its claim held.
A claim of the README is one that holds on every seed of this table; floating point differs across machines and
training amplifies it, so one seed's figures are no claim.

    python seeds.py                                   # the story profile, seeds 1337, 1, 2 -> seeds/seed_*/, seeds/seeds.md
    python seeds.py --seeds=1,2,3,4,5 --out=runs
    python seeds.py --almost="--profile=chat --model=path/to/SmolLM2-135M-Instruct"

A seed whose folder holds verdicts.json (its report stage ran) is not run again; the table is always remade.
"""
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass

from common import UserError, parse_args, read_json, run_cli, write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    seeds: str = "1337,1,2"     # comma-separated seeds, one run each
    out: str = "seeds"          # runs go to {out}/seed_{seed}/; the table to {out}/seeds.md and seeds.json
    almost: str = ""            # more almost.py flags for every run, as one string ("--profile=chat --model=...")


def run_seed(cfg, seed):
    """almost.py for one seed (every stage; a finished run is left as it is). Returns its folder."""
    folder = os.path.join(cfg.out, f"seed_{seed}")
    if os.path.isfile(os.path.join(folder, "verdicts.json")):
        print(f"seeds: {folder} has its verdicts, not run again")
        return folder
    cmd = [sys.executable, os.path.join(HERE, "almost.py"), f"--seed={seed}", f"--out={folder}",
           *shlex.split(cfg.almost)]
    print("seeds: " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"seeds: the run for seed {seed} failed (its output is above; its files are in {folder}). "
                        f"Fix it and rerun: finished stages are skipped.")
    return folder


def fmt(share, x):
    """A verdict's figure as the report writes it: accuracies and shares in %, score differences signed."""
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if share else f"{x:+.3f}"


def table(runs):
    """runs: {seed: (verdicts, timings)} -> (markdown, rows). A row per verdict (in the first run's order): the figure
    and its 95% interval on each seed, the mean and range over seeds, the seeds on which its claim held."""
    seeds = list(runs)
    keys = list(dict.fromkeys(v["key"] for vs, _ in runs.values() for v in vs))
    rows = []
    for key in keys:
        by_seed = {s: next((v for v in runs[s][0] if v["key"] == key), None) for s in seeds}
        found = [v for v in by_seed.values() if v is not None]
        values = [v["value"] for v in found]
        claims = [v["holds"] for v in found if v["holds"] is not None]
        ns = sorted({v["n"] for v in found})
        rows.append(dict(key=key, claim=found[0]["claim"], share=found[0]["share"], n=ns[0] if len(ns) == 1 else f"{ns[0]}-{ns[-1]}",
                         seeds={s: v and {k: v[k] for k in ("value", "lo", "hi", "n", "holds")} for s, v in by_seed.items()},
                         mean=statistics.fmean(values), min=min(values), max=max(values),
                         held=sum(claims) if claims else None, of=len(claims)))
    walls = {s: sum(t.values()) for s, (_, t) in runs.items() if t}
    head = "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [range] | held on |"
    md = [head, "|" + "---|" * (len(seeds) + 3)]
    for r in rows:
        cells = []
        for s in seeds:
            v = r["seeds"][s]
            if v is None:
                cells.append("-")
                continue
            ci = f" [{fmt(r['share'], v['lo'])}, {fmt(r['share'], v['hi'])}]" if v["lo"] is not None else ""
            mark = "" if v["holds"] is None else " ✓" if v["holds"] else " ✗"
            cells.append(f"{fmt(r['share'], v['value'])}{ci}{mark}")
        held = "-" if r["held"] is None else f"{r['held']} of {r['of']}"
        md.append(f"| {r['claim']}, n = {r['n']} | " + " | ".join(cells) +
                  f" | {fmt(r['share'], r['mean'])} [{fmt(r['share'], r['min'])}, {fmt(r['share'], r['max'])}] | {held} |")
    if walls:
        md.append("| wall time of the run | " + " | ".join(f"{walls[s]:.0f} s" if s in walls else "-" for s in seeds) +
                  f" | {statistics.fmean(walls.values()):.0f} s [{min(walls.values()):.0f}, "
                  f"{max(walls.values()):.0f}] | - |")
    return "\n".join(md) + "\n", rows


def main(argv):
    cfg = parse_args(Config, argv)
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds={cfg.seeds!r}: give whole numbers separated by commas, e.g. --seeds=1337,1,2.")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds={cfg.seeds!r}: give at least two different seeds.")
    runs = {}
    for seed in seeds:
        folder = run_seed(cfg, seed)
        timings = os.path.join(folder, "timings.json")
        runs[seed] = (read_json(os.path.join(folder, "verdicts.json")),
                      read_json(timings) if os.path.isfile(timings) else {})
    md, rows = table(runs)
    text = (f"# The verdicts over {len(seeds)} seeds\n\nEach cell: the figure on that seed, its 95% interval, ✓ where "
            f"the claim held (✗ where it did not, or the data could not tell). Runs in `{cfg.out}/seed_*`; flags "
            f"`{cfg.almost or '(none)'}`.\n\n" + md)
    write_text(os.path.join(cfg.out, "seeds.md"), text)
    write_json(os.path.join(cfg.out, "seeds.json"), rows)
    print(md, end="")
    print(f"seeds -> {os.path.join(cfg.out, 'seeds.md')}")


if __name__ == "__main__":
    run_cli(main)
