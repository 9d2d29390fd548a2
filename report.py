"""
What a run shows: the rubric check of step 1 (is the ranking of the generators true here?), the verdicts ("did each
step work?", each against a baseline on the same items, with a 95% interval), out/report.md with SVG charts, the
warnings for data too small to mean anything, and the dry-run plan.
"""
import math
import os
import statistics
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import memory
from common import UserError, read_json, read_records, write_json, write_text
from comparisons import parse_generator, parse_generators, parse_rubric, rouge_tokens, speaker
from eval import MIN_VERDICT_ITEMS, RM_SETS, decided, difference_interval, eval_hhh_judge, mean_interval, \
    results_markdown, spread, tally, wilson
from model import free_memory, load
from readers import read_pairs
from sample import shared_prefix_length
from tokenizer import Tokenizer, format_dialogue
from trainer import memory_dry_run

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# the rubric check: is the ranking assumption true here? An independent look at each generator's answers
@torch.no_grad()
def stage_check(cfg):
    """Per config, over its non-BAD responses: the judge model's mean NLL per token of the response given the
    query alone (no demonstrations), the rate of repeated word 3-grams, and the mean length. The judge is the
    reward model's base (--rm.model; stories: the larger stories260K), which sampled some of these answers itself:
    lower NLL favours its
    own outputs, so read the size axis with that in mind."""
    model, tok = load(cfg.rm.model, device=cfg.device)
    rs = [r for r in read_records(os.path.join(cfg.out, "responses.jsonl")) if not r["bad"]]
    out = {}
    for name in dict.fromkeys(r["config"] for r in rs):
        nll = toks = 0.0
        rep = []
        for r in tqdm([r for r in rs if r["config"] == name], desc=f"check {name}", leave=False):
            if cfg.format == "story":
                prefix, full = tok.encode(r["query"]), tok.encode(r["query"] + " " + r["response"])
            else:
                prefix = tok.encode(format_dialogue(r["query"]))
                full = tok.encode(format_dialogue(r["query"], r["response"]))
            full = full[-model.config.context:]
            n = len(full) - min(len(prefix), len(full) - 1)
            logits = model(torch.tensor([full], device=cfg.device))[0, -n - 1:-1]
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(full[-n:], device=cfg.device),
                                                     reduction="sum").item()
            toks += n
            w = rouge_tokens(r["response"])
            grams = list(zip(w, w[1:], w[2:]))
            rep.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
        out[name] = {"n": len(rep), "nll_per_token": nll / max(toks, 1), "repeated_3grams": statistics.fmean(rep),
                     "mean_chars": statistics.fmean([len(r["response"]) for r in rs if r["config"] == name])}
    result = {"configs": out}
    if cfg.format == "dialogue":
        judge = cfg.judge or cfg.rm.model
        if judge != cfg.rm.model:   # one model in memory at a time
            model = tok = None
            free_memory()
            model, tok = load(judge, device=cfg.device)
        result["axes"] = judge_rubric(cfg, rs, judge, model, tok)
    write_json(os.path.join(cfg.out, "check_stats.json"), result)
    print("check (judge " + os.path.basename(cfg.rm.model.rstrip("/")) + "): " + "; ".join(
        f"{n}: NLL/token {v['nll_per_token']:.3f}, repeated 3-grams {v['repeated_3grams']:.1%}" for n, v in out.items()))
    for axis, a in result.get("axes", {}).items():
        lo, hi = a["ci95"]
        print(f"check: {axis}: the judge prefers the higher-ranked answer in {a['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] "
              f"of {a['n']} queries -> {a['verdict']}")


def rubric_axes(rubric):
    """The rubric's claims that can be checked one at a time: each config against the next rank's configs."""
    levels = [[x] if isinstance(x, str) else list(x) for x in rubric]
    return [(a, b) for hi, lo in zip(levels, levels[1:]) for a in hi for b in lo]


def judge_rubric(cfg, responses, judge, model, tok):
    """Is the rubric's ranking true on this model? For each adjacent pair of ranks (A above B), on queries where
    both answered (not BAD), the judge model (--judge, default --rm.model) reads the query and the two answers in the
    authors' static-HHH judge prompt, in both orders, and prefers A when P(A) summed over the orders is at least
    P(B)'s (eval.eval_hhh_judge). A win rate whose 95% interval lies above 50% supports the rubric's claim; one
    below refutes it. The judge must not be the generators' model to be independent: when it is, say so."""
    by = {}
    for r in responses:
        by.setdefault(r["config"], {})[r["query_id"]] = r
    axes = {}
    gens = {g.name: g for g in parse_generators(cfg.generators, cfg.format)}
    for a, b in rubric_axes(parse_rubric(cfg.rubric, list(gens.values()))):
        common = sorted(set(by.get(a, {})) & set(by.get(b, {})))[:cfg.check_items or None]
        if not common:
            continue
        items = [{"chosen": f"Human: {by[a][q]['query']}\n\nAssistant: {by[a][q]['response']}",
                  "rejected": f"Human: {by[a][q]['query']}\n\nAssistant: {by[b][q]['response']}"} for q in common]
        res = eval_hhh_judge(model, tok, items, batch_size=8)["all"]
        lo, hi = res["ci95"]
        res["verdict"] = ("holds" if lo > 0.5 else "reversed" if hi < 0.5 else "not shown (the interval holds 50%)")
        res["judge"] = judge
        res["judge_is_a_generator"] = any(os.path.abspath(g.model) == os.path.abspath(judge) for g in gens.values())
        axes[f"{a} > {b}"] = res
    return axes

# -----------------------------------------------------------------------------
# Step 1d. The reward model (rm.py) on the synthetic comparisons

def rm_eval_pairs(cfg, name, path, n=None):
    """The pairs a reward model is scored on: the held-out split whole; static HHH (221) and each HH test split
    (about 2,300 pairs) capped at --eval_rm_items (-1: --eval_max_items; 0: all), evenly spaced through the set. The
    same items for every reward model and baseline. n: the number the rm stage scored (rm_stats.json), so that a
    report made under other flags still reads the same items."""
    ps = read_pairs(path)
    cap = n or (cfg.eval_max_items if cfg.eval_rm_items < 0 else cfg.eval_rm_items)
    return ps if name.startswith("held_out") else spread(ps, cap)


def diversity(texts, n=4):
    """Distinct-1 and distinct-2 (unique word n-grams / all word n-grams over the texts), and the word n-gram found
    in the most texts with the share of texts that hold it: collapse onto one template shows in all three."""
    words = [t.lower().split() for t in texts]
    grams = lambda k: [tuple(w[i:i + k]) for w in words for i in range(len(w) - k + 1)]
    d = {f"distinct_{k}": len(set(grams(k))) / max(1, len(grams(k))) for k in (1, 2)}
    per_text = Counter(g for w in words for g in {tuple(w[i:i + n]) for i in range(len(w) - n + 1)})
    phrase, count = per_text.most_common(1)[0] if per_text else ((), 0)
    return {**d, "top_phrase": " ".join(phrase), "top_phrase_share": count / max(1, len(texts)), "texts": len(texts)}


def distinct_2_ratio_interval(texts, base, draws=2000, seed=0):
    """The 95% interval of distinct-2(texts) / distinct-2(base), two policies' answers to the same prompts, by the
    bootstrap over the prompts: each draw resamples the prompts with replacement and takes both policies' answers to
    them (a paired resample), percentiles 2.5 and 97.5 of the ratio over the draws. Seeded: a report is the same on a
    rerun. A text's bigrams are counted once in the unique ones and as often as it is drawn in the total."""
    vocab, sets, sizes = {}, [], []
    for t in texts + base:
        w = t.lower().split()
        grams = [vocab.setdefault(g, len(vocab)) for g in zip(w, w[1:])]
        sets.append(sorted(set(grams)))
        sizes.append(len(grams))
    present = np.zeros((len(sets), max(1, len(vocab))), dtype=bool)             # (texts, bigrams)
    for i, g in enumerate(sets):
        present[i, g] = True
    sizes, n = np.array(sizes), len(texts)
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(draws):
        pick = rng.integers(0, n, n)                                            # the prompts, drawn with replacement
        counts = np.bincount(pick, minlength=n)                                 # how often each prompt is drawn
        d = [present[off:off + n][counts > 0].any(0).sum() / max(1, (counts * sizes[off:off + n]).sum())
             for off in (0, n)]
        ratios.append(d[0] / max(d[1], 1e-9))
    return tuple(float(x) for x in np.percentile(ratios, [2.5, 97.5]))


def nice_ticks(lo, hi, n=5):
    """About n ticks at round values (1, 2, 2.5 or 5 times a power of ten) that cover [lo, hi]."""
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = [first]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(first + len(ticks) * step)
    return [round(t, 12) for t in ticks]


def moving_average(ps, k):
    """The trailing k-point moving average of [(x, y), ...] (fewer points at the start)."""
    return [(x, statistics.fmean(y for _, y in ps[max(0, i - k + 1):i + 1])) for i, (x, _) in enumerate(ps)]


def svg_chart(path, title, xlabel, ylabel, series, hlines=None, bars=False, smooth=0):
    """A small SVG chart, no plotting library: series {name: [(x, y), ...]} as lines (or, bars=True, bars grouped by
    x: one group per x label, one bar per series in it), dashed horizontal reference lines {label: y}, titled and
    labelled axes with ticks at round values. smooth=k: a noisy line is drawn faint, with its trailing k-point moving
    average over it, so a trend shows."""
    W, H, L, R, T, B = 700, 320, 64, 220, 36, 48
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    pts = [p for ps in series.values() for p in ps]
    ys = [y for _, y in pts] + list((hlines or {}).values()) + ([0.0] if bars else [])
    yticks = nice_ticks(min(ys), max(ys))
    y0, y1 = yticks[0], yticks[-1]
    if y1 == y0:
        y1 = y0 + 1
    xs = [x for x, _ in pts]
    groups = list(dict.fromkeys(xs))                                     # bars: the x labels, in order
    slot = (W - L - R) / len(groups)                                     # bars: the width of a group
    w = 0.8 * slot / len(series)                                         # bars: the width of a bar
    fx = (lambda x, c: L + slot * groups.index(x) + 0.1 * slot + (c + 0.5) * w) if bars else \
        (lambda x: L + (x - min(xs)) / ((max(xs) - min(xs)) or 1) * (W - L - R))
    fy = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)
    label = lambda v: f"{v:g}" if abs(v) >= 1e-9 else "0"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">'
           f'{ylabel}</text>']
    for y in yticks:                                                     # y ticks and faint grid lines
        out.append(f'<text x="{L - 6}" y="{fy(y) + 4:.1f}" text-anchor="end">{label(y)}</text>')
        out.append(f'<line x1="{L}" y1="{fy(y):.1f}" x2="{W - R}" y2="{fy(y):.1f}" stroke="#e6e6e6"/>')
    if bars:
        for k, x in enumerate(groups):
            out.append(f'<text x="{L + slot * (k + 0.5):.1f}" y="{H - B + 16}" text-anchor="middle">{x}</text>')
    else:
        for x in nice_ticks(min(xs), max(xs), 6):
            if min(xs) <= x <= max(xs):
                out.append(f'<text x="{fx(x):.1f}" y="{H - B + 16}" text-anchor="middle">{label(x)}</text>')
    for c, (name, ps) in enumerate(series.items()):
        color = colors[c % len(colors)]
        if bars:
            for x, y in ps:
                out.append(f'<rect x="{fx(x, c) - 0.45 * w:.1f}" y="{min(fy(y), fy(0)):.1f}" width="{0.9 * w:.1f}" '
                           f'height="{abs(fy(y) - fy(0)):.1f}" fill="{color}"/>')
                out.append(f'<text x="{fx(x, c):.1f}" y="{fy(y) - 4:.1f}" text-anchor="middle" font-size="9">'
                           f'{y:.2f}</text>')
        else:
            line = lambda qs, width, opacity: (f'<polyline fill="none" stroke="{color}" stroke-width="{width}" '
                                               f'stroke-opacity="{opacity}" points="' +
                                               " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in qs) + '"/>')
            out.append(line(ps, 1 if smooth else 2, 0.35 if smooth else 1))
            if smooth:
                out.append(line(moving_average(ps, smooth), 2.5, 1))
        out.append(f'<text x="{W - R + 8}" y="{T + 16 * c + 10}" fill="{color}">{name}' +
                   (f' ({smooth}-step average)' if smooth and not bars else '') + '</text>')
    for k, (label, y) in enumerate((hlines or {}).items()):
        out.append(f'<line x1="{L}" y1="{fy(y):.1f}" x2="{W - R}" y2="{fy(y):.1f}" stroke="gray" '
                   f'stroke-dasharray="5,4"/>')
        out.append(f'<text x="{W - R + 8}" y="{fy(y) + 4:.1f}" fill="gray">{label}</text>')
    write_text(path, "\n".join(out + ["</svg>"]) + "\n")


def prefer_longer(pairs):
    """The length baseline: the accuracy of "the longer answer is the chosen one" on a set of pairs."""
    return sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / len(pairs)


# The least data each step can learn from (or be judged on) here; below it a stage warns before spending the work,
# and the report says so at its top. Pairs: a reward model from fewer than 100 comparisons learns its training
# pairs, not a preference (the toy preference of the tests needs a few hundred; the paper had thousands). Reward
# model steps: fewer than 10 optimizer steps cannot move the head from its random start. Held-out pairs: a verdict
# needs MIN_VERDICT_ITEMS. Dialogues: SFT on fewer than 50 demonstrations fits them, not a behaviour (one paper SFT
# batch is 64). RL prompts: fewer than one rollout batch repeats prompts within a batch.
SMALL = {"pairs": 100, "rm_steps": 10, "held_out_pairs": MIN_VERDICT_ITEMS, "dialogues": 50}


def small_data_warnings(cfg, which=None):
    """A warning line for each count of this run's data that is below its minimum (SMALL), naming the count, the
    minimum and the flag that raises it. which: only these counts (a stage's own); None: every count on disk."""
    out, counts = [], {}
    pairs = read_records(os.path.join(cfg.out, "comparisons.jsonl"))
    if pairs:
        counts["pairs"] = (len(pairs), "synthetic comparison pairs", "--n_queries")
        train = read_records(os.path.join(cfg.out, "rm_data", "train_filter.jsonl"))
        held = read_records(os.path.join(cfg.out, "rm_data", "val_filter.jsonl"))
        if train:
            tc = cfg.rm
            steps = max(1, int(tc.epochs * max(1, len(train) // tc.batch_size)))
            counts["rm_steps"] = (steps, f"reward-model optimizer steps ({len(train)} training pairs, batches of "
                                         f"{tc.batch_size}, {tc.epochs:g} epochs)", "--n_queries")
            counts["held_out_pairs"] = (len(held), "held-out pairs (its accuracy is no verdict below this)",
                                        "--n_queries")
    dialogues = [r for r in read_records(os.path.join(cfg.out, f"selfplay_n{cfg.n}.jsonl")) if r.get("usable")]
    if dialogues:
        counts["dialogues"] = (len(dialogues), "usable self-play dialogues for SFT", "--n_queries")
    rl = read_records(os.path.join(cfg.out, "rl_queries.jsonl"))
    if rl:
        counts["rl_prompts"] = (len(rl), "RL prompts for PPO", "--n_rl_queries")
    least = dict(SMALL, rl_prompts=cfg.ppo.batch_size)    # RL prompts: one PPO rollout batch
    for k, (n, what, flag) in counts.items():
        if (which is None or k in which) and n < least[k]:
            out.append(f"warning: {n} {what}, fewer than the {least[k]} this step needs to mean something: raise "
                       f"{flag}.")
    return out


def warn(cfg, which):
    """Print the small-data warnings of these counts (a stage's own; none named: nothing is read)."""
    for w in small_data_warnings(cfg, which) if which else []:
        print(w)


def verdict(key, claim, line, value, lo=None, hi=None, n=0, holds=None, share=True, bar=None):
    """One "did it work?" verdict: what is claimed (a short name of the figure and the bar it must clear), its report
    line, its figure with a 95% interval over n items, and whether the claim held (False too where the data cannot
    tell; None: a figure that makes no claim). share: the figure is a share (written in %), else a score difference.
    bar: what the interval's lower edge must clear. verdicts.json keeps these for each run; seeds.py tabulates them."""
    if holds is not None:
        holds = bool(holds and n >= MIN_VERDICT_ITEMS)
    return dict(key=key, claim=claim, line=line, value=value, lo=lo, hi=hi, n=n, holds=holds, share=share, bar=bar)


def verdicts(cfg, rs, sft, ev, div=None):
    """"Did it work?": a verdict (above) per step against a baseline measured on the same items, with 95%
    intervals. div: the diversity of each policy's Vicuna-80 answers (diversity())."""
    return rm_verdicts(cfg, rs) + step2_verdicts(cfg, sft) + ppo_verdicts(cfg, ev, div) + dpo_verdicts(cfg, ev, div) + \
        eval_verdicts(ev)


def pct(p):
    return f"{100 * p:.1f}%"


def rm_verdicts(cfg, rs):
    """Step 1: each reward model's accuracy against chance and the longer-answer baseline; the rubric check."""
    out = []
    if rs:
        sets = {"held_out": ("held-out synthetic pairs", os.path.join(cfg.out, "rm_data", "val_filter.jsonl")),
                "static_hhh": ("static HHH", RM_SETS["static_hhh"]),
                "hh_harmless": ("the HH harmless test split", RM_SETS["hh_harmless"]),
                "hh_helpful": ("the HH helpful test split", RM_SETS["hh_helpful"])}
        for split, (name, path) in sets.items():
            if split not in rs["filter"]:
                continue
            pairs = rm_eval_pairs(cfg, split, path, rs["filter"][split].get("n"))
            m, n = rs["filter"][split]["accuracy"], len(pairs)
            lo, hi = wilson(round(m * n), n)
            base = prefer_longer(pairs)
            nofilter = rs.get("nofilter", {}).get(split, {}).get("accuracy")
            others = f", without the length rule {pct(nofilter)}" if nofilter is not None else ""
            text = ("beats chance, the longer-answer baseline and the reward model without the length rule"
                    if lo > max(0.5, base, nofilter or 0) else
                    "beats chance and the longer-answer baseline, not the reward model without the length rule"
                    if lo > max(0.5, base) else
                    "beats chance, not the longer-answer baseline" if lo > 0.5 else "does not beat chance")
            line = (f"- Step 1, reward model on {name} ({n} pairs): {pct(m)} [{pct(lo)}, {pct(hi)}] against chance 50% "
                    f"and \"prefer the longer answer\" {pct(base)}{others}: **{decided(text, n)}**.")
            out.append(verdict(f"rm_{split}", f"RM accuracy on {name} (> 50%)", line, m, lo, hi, n, holds=lo > 0.5, bar=0.5))
    check = read_json(os.path.join(cfg.out, "check_stats.json")) if os.path.isfile(
        os.path.join(cfg.out, "check_stats.json")) else {}
    for axis, a in check.get("axes", {}).items():
        lo, hi = a["ci95"]
        who = (f"{os.path.basename(a['judge'].rstrip('/'))}, which also wrote the answers" if a["judge_is_a_generator"]
               else os.path.basename(a["judge"].rstrip("/")))
        line = (f"- Step 1, the rubric's claim {axis}: the judge ({who}) prefers the higher-ranked answer in "
                f"{pct(a['accuracy'])} [{pct(lo)}, {pct(hi)}] of {a['n']} queries: "
                f"**{decided(a['verdict'], a['n'])}**.")
        out.append(verdict(f"rubric {axis}", f"the judge agrees with the rubric's {axis} (> 50%)", line,
                           a["accuracy"], lo, hi, a["n"], holds=lo > 0.5, bar=0.5))
    return out


def step2_verdicts(cfg, sft):
    """Step 2: the best-of-N gain of self-play, and SFT on its dialogues against SFT on plain self-play."""
    out = []
    sp = read_records(os.path.join(cfg.out, f"selfplay_n{cfg.n}.jsonl"))
    gains = [max(s) - statistics.fmean(s) for r in sp for cs in r["candidates"]
             for s in [[c["score"] for c in cs if not c["bad"]]] if len(s) > 1]
    if gains:
        g, (lo, hi) = mean_interval(gains)
        text = decided(f"{'raised' if lo > 0 else 'did not raise'} the demonstrations' reward", len(gains))
        line = (f"- Step 2, RM-guided self-play: the chosen candidate scores {g:.3f} [{lo:.3f}, {hi:.3f}] above the "
                f"mean candidate of its turn ({len(gains)} turns): **{text}** (judged by the reward model that chose "
                f"them).")
        out.append(verdict("selfplay_gain", "self-play: chosen minus mean candidate, RM score (> 0)", line,
                           g, lo, hi, len(gains), holds=lo > 0, share=False, bar=0.0))
    if sft and "scores" in sft.get("sft", {}) and "scores" in sft.get("sft_plain", {}):
        d = [a - b for a, b in zip(sft["sft"]["scores"], sft["sft_plain"]["scores"])]
        g, (lo, hi) = mean_interval(d)                          # paired: each query's difference
        text = decided('better' if lo > 0 else 'worse' if hi < 0 else 'no clear difference', len(d))
        line = (f"- Step 2, SFT on RM-guided against plain self-play, {len(d)} held-out queries: RM score {g:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}] (paired t interval): **{text}** (the same reward model judges).")
        out.append(verdict("sft_vs_plain", "SFT on RM-guided minus plain self-play, RM score (> 0)", line,
                           g, lo, hi, len(d), holds=lo > 0, share=False, bar=0.0))
    return out


def ppo_verdicts(cfg, ev, div):
    """Step 3: PPO's own training reward (last quarter against the first), its diversity against SFT's, and its
    Vicuna-80 answers against SFT's by the reward model (diversity_verdict, vicuna_verdict)."""
    out = []
    ppo_rows = read_records(os.path.join(cfg.out, "ppo", "metrics.jsonl"))
    if len(ppo_rows) >= 8:   # PPO's own training reward: the last quarter of the steps against the first
        q = len(ppo_rows) // 4
        first, last = [r["rm_score_mean"] for r in ppo_rows[:q]], [r["rm_score_mean"] for r in ppo_rows[-q:]]
        g, (lo, hi) = difference_interval(first, last)
        text = decided("rose" if lo > 0 else "fell" if hi < 0 else "did not change beyond its step-to-step noise", q)
        line = (f"- Step 3, PPO's training reward (the reward model's normalised score of its rollouts), last {q} "
                f"steps against the first {q}: {statistics.fmean(first):+.3f} -> {statistics.fmean(last):+.3f}, a "
                f"change of {g:+.3f} [{lo:+.3f}, {hi:+.3f}] (Welch t interval over the steps): **{text}**.")
        out.append(verdict("ppo_reward", "PPO training reward, last quarter minus first (> 0)", line,
                           g, lo, hi, q, holds=lo > 0, share=False, bar=0.0))
    out += [v for v in (diversity_verdict("PPO", "ppo", div), vicuna_verdict("PPO", "ppo", ev)) if v]
    return out


def diversity_verdict(name, key, div):
    """A policy's distinct-2 on Vicuna-80 over the SFT policy's, with its bootstrap interval: kept (the interval above
    80%), collapsed (below), or too close to the bar to tell."""
    if not div or "sft" not in div or key not in div:
        return None
    d, base = div[key], div["sft"]
    r = d["distinct_2"] / max(base["distinct_2"], 1e-9)
    lo, hi = d.get("ratio_ci", (None, None))
    text = decided("kept its diversity" if lo is not None and lo >= 0.8 else "collapsed onto what the reward model "
                   "likes" if hi is not None and hi < 0.8 else "too close to the bar to tell", d["texts"])
    ci = f" [{lo:.0%}, {hi:.0%}] (bootstrap over the prompts)" if lo is not None else ""
    line = (f"- Step 3, diversity: {name}'s distinct-2 is {r:.0%}{ci} of the SFT policy's ({d['distinct_2']:.3f} vs "
            f"{base['distinct_2']:.3f}); its most shared 4-gram, \"{d['top_phrase']}\", is in "
            f"{d['top_phrase_share']:.0%} of its answers: **{text}** (80% of SFT's is the bar).")
    return verdict(f"{key}_diversity", f"{name}'s distinct-2 over SFT's (>= 80%)", line, r, lo, hi, n=d["texts"],
                   holds=lo is not None and lo >= 0.8, bar=0.8)


def vicuna_verdict(name, key, ev):
    """A policy against the SFT policy on Vicuna-80, judged by the reward model: the share of the decided pairs in
    which its answer scores higher, with its Wilson interval."""
    v = (ev or {}).get("vicuna", {}).get(key, {}).get("rm")
    if not v:
        return None
    n = v["win"] + v["loss"]                                     # the pairs the reward model decides
    lo, hi = wilson(v["win"], n)
    text = decided("raised the reward on these unseen prompts" if lo > 0.5 else "lowered it" if hi < 0.5 else
                   "no clear change", n)
    line = (f"- Step 3, {name} against the SFT policy on Vicuna-80, judged by the reward model: {v['win']} / "
            f"{v['tie']} / {v['loss']} (mean score {v['mean_score']:.2f} vs {v['mean_score_baseline']:.2f}); "
            f"{name}'s answer scores higher in {pct(v['win'] / max(n, 1))} [{pct(lo)}, {pct(hi)}] of the {n} decided "
            f"pairs: **{text}**. **Caveat: this judge is the reward model {name} "
            f"{'optimised' if key == 'ppo' else 'ranked its pairs with'}**; a higher score shows the reward went up, "
            f"not that the answers are better.")
    return verdict(f"{key}_vicuna_rm", f"{name}'s answer above SFT's on Vicuna-80 by the RM (> 50%)", line,
                   v["win"] / max(n, 1), lo, hi, n, holds=lo > 0.5, bar=0.5)


def dpo_verdicts(cfg, ev, div):
    """Step 3 without RL: DPO's implicit reward on its held-out pairs, its Vicuna-80 answers against SFT's and against
    PPO's by the reward model, and its diversity against SFT's."""
    out = []
    held = [r for r in read_records(os.path.join(cfg.out, "dpo", "metrics.jsonl")) if r.get("split") == "val"]
    if held:
        m, n = held[-1]["accuracy"], held[-1]["n"]
        lo, hi = wilson(round(m * n), n)
        text = decided("learned the preferences" if lo > 0.5 else "did not learn them beyond chance", n)
        line = (f"- Step 3 without RL, DPO's implicit reward on its {n} held-out pairs ({cfg.dpo_pairs}): prefers the "
                f"chosen answer in {pct(m)} [{pct(lo)}, {pct(hi)}]: **{text}**.")
        out.append(verdict("dpo_heldout", "DPO's implicit reward on held-out pairs (> 50%)", line, m, lo, hi, n,
                           holds=lo > 0.5, bar=0.5))
    out += [v for v in (vicuna_verdict("DPO", "dpo", ev),) if v]
    v = (ev or {}).get("vicuna", {})
    a, b = v.get("dpo", {}).get("rm", {}).get("scores"), v.get("ppo", {}).get("rm", {}).get("scores")
    if a and b and len(a) == len(b):
        t = tally(a, b)
        n = t["win"] + t["loss"]
        lo, hi = wilson(t["win"], n)
        text = decided("DPO's answers score higher" if lo > 0.5 else "PPO's answers score higher" if hi < 0.5 else
                       "no clear difference", n)
        line = (f"- Step 3, DPO against PPO on Vicuna-80, judged by the reward model: {t['win']} / {t['tie']} / "
                f"{t['loss']} (mean score {statistics.fmean(a):.2f} vs {statistics.fmean(b):.2f}); DPO's answer scores "
                f"higher in {pct(t['win'] / max(n, 1))} [{pct(lo)}, {pct(hi)}] of the {n} decided pairs: **{text}** "
                f"(PPO optimised this reward model; DPO saw only pairs it ranked).")
        out.append(verdict("dpo_vs_ppo_vicuna_rm", "DPO's answer above PPO's on Vicuna-80 by the RM (> 50%)", line,
                           t["win"] / max(n, 1), lo, hi, n, holds=lo > 0.5, bar=0.5))
    out += [v for v in (diversity_verdict("DPO", "dpo", div),) if v]
    return out


def eval_verdicts(ev):
    """The evaluation suite: each policy as a judge on static HHH (TruthfulQA MC1 beside it, no claim)."""
    out = []
    if ev and ev.get("models"):
        for name, m in ev["models"].items():
            a, t = m["static_hhh"]["all"], m["truthfulqa_mc1"]
            lo, hi = a["ci95"]
            text = decided('above chance' if lo > 0.5 else 'not distinguishable from chance', a["n"])
            line = (f"- Evaluation, {name} as judge on static HHH ({a['n']} items): {pct(a['accuracy'])} "
                    f"[{pct(lo)}, {pct(hi)}]: **{text}**; TruthfulQA MC1 {pct(t['accuracy'])}.")
            out.append(verdict(f"judge_{name}", f"{name} as judge on static HHH (> 50%)", line, a["accuracy"],
                               lo, hi, a["n"], holds=lo > 0.5, bar=0.5))
            out.append(verdict(f"truthfulqa_{name}", f"TruthfulQA MC1, {name} (no claim)", "", t["accuracy"],
                               *t.get("ci95", (None, None)), n=t.get("n", 0)))
    return out


def stage_report(cfg):
    """out/report.md: does each step work (a verdict against a baseline, with intervals), samples before and after
    self-play and PPO, the diversity of the policies' answers, the figures of every stage (a table, also printed),
    and SVG charts of the PPO curves and the reward models' accuracy."""
    j = lambda f: read_json(os.path.join(cfg.out, f)) if os.path.isfile(os.path.join(cfg.out, f)) else None
    cs, rs, sp, sft, ev, tm = (j("compare_stats.json"), j("rm_stats.json"), j("selfplay_stats.json"),
                               j("sft_stats.json"), j(os.path.join("eval", "results.json")), j("timings.json"))
    ppo_rows = read_records(os.path.join(cfg.out, "ppo", "metrics.jsonl"))
    answers = {n: [r["text"] for r in read_records(os.path.join(cfg.out, "eval", "vicuna", f"{n}.jsonl"))]
               for n in ("base", "sft", "ppo", "dpo")}
    answers = {n: a for n, a in answers.items() if a}
    div = {n: diversity(a) for n, a in answers.items()}
    for n in ("ppo", "dpo"):
        if n in div and "sft" in div and len(answers[n]) == len(answers["sft"]):
            div[n]["ratio_ci"] = distinct_2_ratio_interval(answers[n], answers["sft"])
    table = figures_table(cfg, cs, rs, sp, sft, ppo_rows, div, tm)
    md = ["# ALMoST run report", "", f"Output folder `{cfg.out}`, profile `{cfg.profile}`.", ""]
    warnings = small_data_warnings(cfg)
    if warnings:
        md += ["**Too little data for some steps: their verdicts below are not evidence.**", ""] + \
              [f"- {w.removeprefix('warning: ')}" for w in warnings] + [""]
    md += ["## Did it work?", ""]
    vs = verdicts(cfg, rs, sft, ev, div)
    verdict_lines = [v["line"] for v in vs if v["line"]]
    md += verdict_lines or ["(no stage has run yet)"]
    md += ["", "## Figures", "", table] + samples_markdown(cfg, answers)
    if ev:
        md += ["## Evaluation", "", results_markdown(ev)]
    md += charts(cfg, ppo_rows, rs)
    write_text(os.path.join(cfg.out, "report.md"), "\n".join(md))
    write_json(os.path.join(cfg.out, "verdicts.json"), vs)
    print(table, end="")
    print("\n".join(verdict_lines))
    print(f"report -> {os.path.join(cfg.out, 'report.md')}")


def figures_table(cfg, cs, rs, sp, sft, ppo_rows, div, tm):
    """The figures of every stage that has run, as a markdown table."""
    rows = []
    if cs:
        rows.append(("comparisons (with / without the length rule)", f"{cs['pairs']} / {cs['pairs_without_length_rule']}"))
        rows.append(("BAD rate per config", ", ".join(f"{k} {v:.0%}" for k, v in cs["bad_rate"].items())))
    if rs:
        for k, v in rs.items():
            rows.append((f"RM {'with' if k == 'filter' else 'without'} the length rule: held-out acc / length corr "
                         f"/ static HHH / HH harmless / HH helpful",
                         f"{v['held_out']['accuracy']:.3f} / {v['held_out']['length_corr']:.2f} / " +
                         " / ".join(f"{v[s]['accuracy']:.3f}" if s in v else "-" for s in RM_SETS)))
    if sp:
        rows.append(("self-play: RM score of chosen vs random candidate", f"{sp['chosen_score']:.3f} vs {sp['random_score']:.3f}"))
        if sp.get("ended_no_room"):
            rows.append(("self-play: dialogues ended early, no room in the context", str(sp["ended_no_room"])))
    if sft:
        rows.append(("held-out RM score: SFT on RMSP / plain self-play / base", " / ".join(
            f"{sft[k]['mean_rm_score']:.3f}" for k in ("sft", "sft_plain", "base") if k in sft)))
    dpo_rows = read_records(os.path.join(cfg.out, "dpo", "metrics.jsonl"))
    held = [r for r in dpo_rows if r.get("split") == "val"]
    if held:
        rows.append(("DPO: held-out implicit reward accuracy / loss, first -> last evaluation",
                     f"{held[0]['accuracy']:.3f} -> {held[-1]['accuracy']:.3f} / {held[0]['loss']:.4f} -> "
                     f"{held[-1]['loss']:.4f}"))
    if ppo_rows:
        a, b = ppo_rows[:5], ppo_rows[-5:]
        m = lambda rr, k: sum(r[k] for r in rr) / len(rr)
        rows.append(("PPO: RM score first 5 -> last 5 steps", f"{m(a, 'rm_score_mean'):.3f} -> {m(b, 'rm_score_mean'):.3f}"))
        rows.append(("PPO: KL (last 5 steps), generation share of a step", f"{m(b, 'kl'):.1f} nats, {m(ppo_rows, 'gen_time_share'):.0%}"))
    for n, d in div.items():
        rows.append((f"diversity of {n}'s Vicuna-80 answers: distinct-1 / distinct-2 / most shared 4-gram",
                     f"{d['distinct_1']:.3f} / {d['distinct_2']:.3f} / \"{d['top_phrase']}\" in "
                     f"{d['top_phrase_share']:.0%} of answers"))
    if tm:
        rows.append(("wall time", ", ".join(f"{k} {v:.0f}s" for k, v in tm.items())))
    return "| figure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def samples_markdown(cfg, answers):
    """The first Vicuna-80 questions answered by each policy, and one self-play turn's candidates with their scores."""
    md = []
    if answers:
        qs = read_records(os.path.join(HERE, "data", "vicuna_bench", "question.jsonl"))
        md += ["## Samples: the same questions before and after self-play, PPO and DPO", ""]
        for i in range(min(2, min(map(len, answers.values())))):
            md.append(f"**{qs[i]['turns'][0]}**\n")
            md += [f"- {n}: {a[i][:400]!r}" for n, a in answers.items()] + [""]
    spr = read_records(os.path.join(cfg.out, f"selfplay_n{cfg.n}.jsonl"))
    turn = next(((r, cs) for r in spr for cs in r["candidates"] if sum(not c["bad"] for c in cs) > 1), None)
    if turn:
        r, cs = turn
        md += ["## Self-play: the candidates of one assistant turn, with their RM scores", "",
               f"Query: {r['query']!r}", ""]
        md += [f"- {'**chosen** ' if c.get('chosen') else ''}{c['score']:.3f}{' BAD' if c['bad'] else ''}: "
               f"{c['text'][:300]!r}" for c in cs] + [""]
    return md


def charts(cfg, ppo_rows, rs):
    """SVG charts of the PPO curves and of the reward models' accuracy against the baselines; their markdown."""
    md = []
    if ppo_rows:
        steps = [r["step"] for r in ppo_rows]
        for key, title, ylabel in (("rm_score_mean", "PPO: reward-model score", "mean RM score (normalised)"),
                                   ("kl", "PPO: KL to the SFT policy", "KL (nats per response)"),
                                   ("entropy", "PPO: policy entropy", "entropy (nats per token)")):
            if key in ppo_rows[0]:
                svg_chart(os.path.join(cfg.out, f"report_ppo_{key}.svg"), title, "PPO step", ylabel,
                          {"PPO policy": list(zip(steps, [r[key] for r in ppo_rows]))}, smooth=5)
                md += [f"![{title}](report_ppo_{key}.svg)", ""]
    if rs:
        sets = {"held_out": ("held out", os.path.join(cfg.out, "rm_data", "val_filter.jsonl")),
                "static_hhh": ("static HHH", RM_SETS["static_hhh"]), "hh_harmless": ("HH harmless", RM_SETS["hh_harmless"]),
                "hh_helpful": ("HH helpful", RM_SETS["hh_helpful"])}
        sets = {k: v for k, v in sets.items() if k in rs["filter"]}
        series = {f"RM {'with' if k == 'filter' else 'without'} the length rule":
                  [(sets[s][0], v[s]["accuracy"]) for s in sets] for k, v in rs.items()}
        series["prefer the longer answer"] = [
            (label, prefer_longer(rm_eval_pairs(cfg, s, f, rs["filter"][s].get("n")))) for s, (label, f) in sets.items()]
        svg_chart(os.path.join(cfg.out, "report_rm.svg"), "Reward models against baselines, same pairs",
                  "evaluation set", "accuracy", series, hlines={"chance": 0.5}, bars=True)
        md += ["![Reward models' accuracy](report_rm.svg)", ""]
    return md



# -----------------------------------------------------------------------------
# the dry run's plan

def shared_prefix_tokens(model, g, fmt):
    """Tokens of the few-shot prompt every row of generator g starts with (0: none, or no tokenizer in `model`)."""
    if g is None or fmt != "dialogue" or not os.path.isfile(os.path.join(model, "config.json")):
        return 0
    try:
        tok = Tokenizer(model)
    except UserError:
        return 0
    prompted = speaker(g, None, tok, fmt)   # what the sampler will share: the common start of two rows' prompts
    return shared_prefix_length([prompted.prompt([("user", q)]) for q in ("Yes?", "No.")])


def print_plan(cfg, stages, trainer_dry_runs):
    """The dry run: what each stage would do and roughly how many tokens it would generate, and the memory per GPU
    of each sampling stage; then trainer_dry_runs (callables) print the trainers' plans."""
    print(f"plan for --profile={cfg.profile} into {cfg.out}:")
    n = cfg.n_queries
    total = 0
    for s in stages:
        if s == "queries":
            t = (n + cfg.n_rl_queries) * 14 * 64   # the bundled run needed about 14 samples of 64 tokens a query
            line = (f"{n} queries + {cfg.n_rl_queries} RL prompts from {cfg.query_model} (seeds {cfg.seeds}), "
                    f"~{t:,} tokens")
        elif s == "responses":
            gens = parse_generators(cfg.generators, cfg.format)
            t = n * sum(g.max_new_tokens for g in gens)
            line = f"{n} queries x {len(gens)} generators ({', '.join(g.name for g in gens)}), <= {t:,} tokens"
        elif s == "selfplay":
            a, u = parse_generator("--assistant", cfg.assistant, cfg.format), parse_generator("--user", cfg.user, cfg.format)
            k = n - max(1, n // 10)
            ns = cfg.n + (1 if cfg.selfplay_baseline and cfg.n != 1 else 0)
            t = k * (cfg.turns * ns * a.max_new_tokens + (cfg.turns - 1) * 2 * u.max_new_tokens)
            line = f"{k} dialogues, {cfg.turns} turns, n={cfg.n} (+ baseline), assistant {a.model}, <= {t:,} tokens"
        elif s == "ppo":
            p = cfg.ppo
            t = p.steps * p.batch_size * p.max_new_tokens
            line = (f"{p.steps} steps x {p.batch_size} rollouts from {os.path.join(cfg.out, 'sft', 'best')}, "
                    f"<= {t:,} tokens")
        elif s == "dpo":
            t = cfg.n_rl_queries * cfg.dpo_n * cfg.ppo.max_new_tokens if cfg.dpo_pairs == "onpolicy" else 0
            line = (f"DPO from {os.path.join(cfg.out, 'sft', 'best')} on {cfg.dpo_pairs} pairs" +
                    (f" ({cfg.n_rl_queries} RL prompts x {cfg.dpo_n} answers, <= {t:,} tokens)" if t else ""))
        elif s == "eval":
            t = 4 * 80 * (120 if cfg.format == "story" else 1024)
            line = f"static HHH, HH, TruthfulQA MC1, Vicuna-80 (base, SFT, PPO, DPO), <= {t:,} tokens"
        else:
            t, line = 0, {"compare": "the comparison rule (no sampling)", "check": "judge NLL of every answer",
                          "rm": f"reward model(s) from {cfg.rm.model}", "sft": "SFT of the assistant model, 2 runs",
                          "report": os.path.join(cfg.out, "report.md")}[s]
        total += t
        print(f"  {s:9s} {line}")
    print(f"  about {total:,} tokens to generate in all")
    # memory per GPU of the sampling stages: each model at --batch_size rows of its whole context window (the most
    # the sampler's KV cache can hold), and the largest batch that fits
    # A generator's few-shot prompt is a prefix all its rows share, which the sampler caches once: the plan counts it
    # once for the model's use with the shortest such prefix (queries share none), when the model's tokenizer is here
    samplers = {}
    if "queries" in stages:
        samplers.setdefault(cfg.query_model, []).append(("queries", None))
    if "responses" in stages:
        for g in parse_generators(cfg.generators, cfg.format):
            samplers.setdefault(g.model, []).append((f"responses {g.name}", g))
    if "selfplay" in stages:
        for role in ("assistant", "user"):
            g = parse_generator(f"--{role}", getattr(cfg, role), cfg.format)
            samplers.setdefault(g.model, []).append((f"selfplay {role}", g))
    for model, uses in samplers.items():
        ctx = memory.model_config(model).context
        shared = min(shared_prefix_tokens(model, g, cfg.format) for _, g in uses)
        memory_dry_run(cfg, model, "sample", cfg.batch_size, ctx, shared=shared)
        print(f"  (used by: {', '.join(u for u, _ in uses)}; " +
              (f"a prompt prefix of {shared} tokens shared by every row)" if shared else "no shared prefix counted)"))
    for dry_run in trainer_dry_runs:   # the trainer stages' memory per GPU: each trainer's own dry run
        dry_run()
