"""
The pipeline over several seeds and float paths: each run of almost.py in a folder of its own, then every verdict of
the report tabulated: on how many runs its claim held, its mean and range, the run that came nearest its bar, and a
status. Floating point differs across machines (kernels, reduction order, thread count) and training amplifies it, so
each seed runs on two float paths, one and two torch threads: a claim the README lists as held on every run held on
every one of them, with its intervals clear of the bar by more than the runs' spread.

    python seeds.py                            # the story profile: seeds 1337, 1, 2, 3, 4 x threads 1, 2 -> seeds/
    python seeds.py --seeds=1,2,3 --threads=2 --out=runs
    python seeds.py --almost="--profile=chat --model=path/to/SmolLM2-135M-Instruct" --jobs=2

A run whose folder holds verdicts.json (its report stage ran) is not run again; the table is always remade.
"""
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common import UserError, parse_args, read_json, run_cli, write_json, write_text

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    seeds: str = "1337,1,2,3,4"  # comma-separated seeds
    threads: str = "1,2"        # torch threads of each seed's runs: the float paths (another CPU's order of sums)
    out: str = "seeds"          # runs go to {out}/seed_{seed}_t{threads}/; the table to {out}/seeds.md, seeds.json
    almost: str = ""            # more almost.py flags for every run, as one string ("--profile=chat --model=...")
    jobs: int = 1               # runs at once (2 one-thread runs share a 2-core machine as one two-thread run does)


def run(cfg, seed, threads):
    """almost.py for one seed on `threads` torch threads (every stage; a finished run is left as it is). Returns its
    folder."""
    folder = os.path.join(cfg.out, f"seed_{seed}_t{threads}")
    if os.path.isfile(os.path.join(folder, "verdicts.json")):
        print(f"seeds: {folder} has its verdicts, not run again")
        return folder
    cmd = [sys.executable, os.path.join(HERE, "almost.py"), f"--seed={seed}", f"--out={folder}",
           *shlex.split(cfg.almost)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"seeds: OMP_NUM_THREADS={threads} " + " ".join(cmd), flush=True)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "seeds_run.log"), "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise UserError(f"seeds: the run for seed {seed} on {threads} thread(s) failed (its output is in "
                        f"{folder}/seeds_run.log). Fix it and rerun: finished stages are skipped.")
    return folder


def fmt(share, x):
    """A verdict's figure as the report writes it: accuracies and shares in %, score differences signed."""
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if share else f"{x:+.3f}"


def status(held, of, edges, bar):
    """A claim over its runs: "held on every run" only where it held on all of them and the nearest interval edge is
    clear of the bar by more than the edges' spread over the runs (their standard deviation: another float path may
    sit that much lower); "borderline" where it held on all but sits within that noise of the bar; else how often."""
    if held is None:
        return "no claim"
    if held == 0:
        return "held on no run"
    if held < of:
        return f"held on {held} of {of} runs"
    spread = statistics.stdev(edges) if len(edges) > 1 else 0.0
    if bar is not None and edges and min(edges) - bar <= spread:
        return "borderline: held on every run, its nearest interval edge within the runs' spread of the bar"
    return "held on every run"


def table(runs):
    """runs: {name: (verdicts, timings)} -> (markdown, rows). A row per verdict (in the first run's order): the runs
    its claim held on, its mean and range over the runs, the interval of the run nearest the bar, the status (status),
    and every run's figure and interval (in rows)."""
    names = list(runs)
    keys = list(dict.fromkeys(v["key"] for vs, _ in runs.values() for v in vs))
    rows = []
    for key in keys:
        by_run = {n: next((v for v in runs[n][0] if v["key"] == key), None) for n in names}
        found = [v for v in by_run.values() if v is not None]
        values = [v["value"] for v in found]
        claims = [v["holds"] for v in found if v["holds"] is not None]
        edges = [v["lo"] for v in found if v.get("lo") is not None]
        nearest = min((v for v in found if v.get("lo") is not None), key=lambda v: v["lo"], default=None)
        ns = sorted({v["n"] for v in found})
        held = sum(claims) if claims else None
        rows.append(dict(key=key, claim=found[0]["claim"], share=found[0]["share"], bar=found[0].get("bar"),
                         n=ns[0] if len(ns) == 1 else f"{ns[0]}-{ns[-1]}",
                         runs={n: v and {k: v.get(k) for k in ("value", "lo", "hi", "n", "holds")}
                               for n, v in by_run.items()},
                         mean=statistics.fmean(values), min=min(values), max=max(values), held=held, of=len(claims),
                         nearest=nearest and [nearest["lo"], nearest["hi"]],
                         status=status(held, len(claims), edges, found[0].get("bar"))))
    md = ["| claim | held on | mean [range] over the runs | nearest run's interval | status |", "|---|---|---|---|---|"]
    for r in rows:
        near = f"[{fmt(r['share'], r['nearest'][0])}, {fmt(r['share'], r['nearest'][1])}]" if r["nearest"] else "-"
        held = "-" if r["held"] is None else f"{r['held']} of {r['of']}"
        md.append(f"| {r['claim']}, n = {r['n']} | {held} | {fmt(r['share'], r['mean'])} [{fmt(r['share'], r['min'])}, "
                  f"{fmt(r['share'], r['max'])}] | {near} | {r['status']} |")
    walls = {n: sum(t.values()) for n, (_, t) in runs.items() if t}
    if walls:
        md.append(f"| wall time of a run | - | {statistics.fmean(walls.values()):.0f} s [{min(walls.values()):.0f}, "
                  f"{max(walls.values()):.0f}] | - | - |")
    return "\n".join(md) + "\n", rows


def per_run(rows, names):
    """Every run's figure of every verdict, a column a run (seeds.md's second table)."""
    md = ["| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            v = r["runs"][n]
            mark = "" if v is None or v["holds"] is None else " ✓" if v["holds"] else " ✗"
            cells.append("-" if v is None else f"{fmt(r['share'], v['value'])}{mark}")
        md.append(f"| {r['claim']} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def numbers(spec, flag):
    try:
        out = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag}={spec!r}: give whole numbers separated by commas.") from None
    if not out or len(set(out)) != len(out):
        raise UserError(f"{flag}={spec!r}: give different numbers, separated by commas.")
    return out


def main(argv):
    cfg = parse_args(Config, argv)
    seeds, threads = numbers(cfg.seeds, "--seeds"), numbers(cfg.threads, "--threads")
    if len(seeds) * len(threads) < 2:
        raise UserError(f"--seeds={cfg.seeds!r} --threads={cfg.threads!r}: give at least two runs (two different "
                        f"seeds, or two thread counts).")
    if cfg.jobs < 1:
        raise UserError(f"--jobs={cfg.jobs}: give 1 or more.")
    plan = [(s, t) for s in seeds for t in threads]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        folders = list(pool.map(lambda st: run(cfg, *st), plan))
    runs = {}
    for (s, t), folder in zip(plan, folders):
        timings = os.path.join(folder, "timings.json")
        runs[f"{s}/t{t}"] = (read_json(os.path.join(folder, "verdicts.json")),
                             read_json(timings) if os.path.isfile(timings) else {})
    md, rows = table(runs)
    text = (f"# The verdicts over {len(runs)} runs\n\nSeeds {cfg.seeds}, each on {cfg.threads} torch thread(s) "
            f"(runs in `{cfg.out}/seed_*_t*`; almost.py flags `{cfg.almost or '(none)'}`). A claim held on a run "
            f"where its 95% interval cleared the bar; \"held on every run\" needs every run, with the nearest "
            f"interval edge clear of the bar by more than the runs' spread.\n\n" + md +
            "\nEach run's figure (✓ where its claim held, ✗ where it did not or the data could not tell):\n\n" +
            per_run(rows, list(runs)))
    write_text(os.path.join(cfg.out, "seeds.md"), text)
    write_json(os.path.join(cfg.out, "seeds.json"), rows)
    print(md, end="")
    print(f"seeds -> {os.path.join(cfg.out, 'seeds.md')}")


if __name__ == "__main__":
    run_cli(main)
