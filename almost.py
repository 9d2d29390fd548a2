"""
The ALMoST pipeline. Step 1, reward modeling from synthetic feedback (ALMOST.md 1a-1c): the exact rules.

    rouge_l(a, b)                       the novelty filter of query generation (1a)
    postprocess_response(text)          cut a sampled response out of its continuation (1b)
    is_bad_response(text)               the BAD rules (1b)
    make_comparisons(responses, rubric) synthetic comparisons with the heuristic length filter (1c)

and the file plumbing every stage is built on: append-only jsonl, flushed per record, that a rerun resumes.

Not written yet: the stages themselves (queries, responses, compare, rm) with their CLI and the two profiles
(the paper's, and the bundled story profile); see the README's status line.
"""
import json
import os
import re
import statistics

from model import UserError


# -----------------------------------------------------------------------------
# 1a. ROUGE-L, the novelty filter (Self-Instruct): a new query is kept only if its ROUGE-L F1 against every query
# already in the pool is < 0.5

def rouge_tokens(text):
    """Lowercase word tokens: runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a, b):
    """ROUGE-L F1 of two texts: LCS over lowercase word tokens, F = 2PR / (P + R). 0 if either is empty."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    if not ta or not tb:
        return 0.0
    lcs = lcs_length(ta, tb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(ta), lcs / len(tb)
    return 2 * p * r / (p + r)


# -----------------------------------------------------------------------------
# 1b. prompted responses: post-processing and the BAD rules

def postprocess_response(text):
    """The model's continuation -> the response: cut at the next "-----" (the end of a demonstration), then
    before the next "Assistant:", then before the next "Human:"; strip."""
    text = text.split("-----")[0]
    text = text.split("Assistant:")[0]
    text = text.split("Human:")[0]
    return text.strip()


APOSTROPHES = "'\u2019\u2018\u02bc`\u00b4"


def is_bad_response(text):
    """A response is BAD (dropped) if it is shorter than 50 characters, ends with "?" or ":", does not end with
    "." or "!", starts with "well", contains "don't know" / "do not know" (any apostrophe, any case), or contains
    "Human:" or "<Image>" (any case)."""
    t = text.strip()
    low = t.lower()
    return (len(t) < 50 or t.endswith(("?", ":")) or not t.endswith((".", "!")) or low.startswith("well")
            or re.search(rf"(don[{APOSTROPHES}]t|do not)\s+know", low) is not None
            or "human:" in low or "<image>" in low)


# -----------------------------------------------------------------------------
# 1c. synthetic comparisons (the exact rule of the authors' code, plus dropping identical pairs)

def rubric_ranks(rubric):
    """rubric: config names best first; an item may be a list of names that share a rank.
    -> {name: (rank, position in the flattened rubric)}"""
    ranks, pos = {}, 0
    for rank, item in enumerate(rubric):
        for name in ([item] if isinstance(item, str) else item):
            if name in ranks:
                raise UserError(f"rubric: config {name!r} appears twice.")
            ranks[name] = (rank, pos)
            pos += 1
    return ranks


def make_comparisons(responses, rubric):
    """responses: dicts {"query", "config", "response"}; rubric: config names best first (an item may be a list
    of names sharing a rank). Returns {"prompt", "chosen", "rejected", "meta"} dicts in the order the rule walks,
    queries in first-seen order. Per query, over its non-BAD responses:
      - fewer than 2: no pairs; else sort by rank, best first (tied configs keep rubric order);
      - M, S = mean and population std of their lengths; a response is long enough iff len >= M - S/2;
      - walk the index pairs (i < j) in order and emit chosen=i, rejected=j unless they share a rank, or i's
        rank already gave a chosen for this query, or len(chosen) < len(rejected) and chosen is not long enough.
    So at most K-1 pairs a query; a too-short better answer is paired with the next worse one shorter than it.
    Pairs whose two texts are identical are dropped at the end."""
    ranks = rubric_ranks(rubric)
    by_query = {}
    for r in responses:
        if r["config"] not in ranks:
            raise UserError(f"config {r['config']!r} is not in the rubric {rubric}: add it, or leave its "
                            f"responses out.")
        by_query.setdefault(r["query"], []).append(r)
    pairs = []
    for query, rs in by_query.items():
        good = [r for r in rs if not is_bad_response(r["response"])]
        if len(good) < 2:
            continue
        good.sort(key=lambda r: ranks[r["config"]])                            # stable
        lengths = [len(r["response"].strip()) for r in good]
        long_enough = statistics.fmean(lengths) - statistics.pstdev(lengths) / 2
        used = set()                                                           # ranks that already gave a chosen
        for i in range(len(good)):
            for j in range(i + 1, len(good)):
                ci, cj = good[i], good[j]
                ri, rj = ranks[ci["config"]][0], ranks[cj["config"]][0]
                if ri == rj or ri in used:
                    continue
                if lengths[i] < lengths[j] and lengths[i] < long_enough:
                    continue
                used.add(ri)
                pairs.append({"prompt": query, "chosen": ci["response"].strip(), "rejected": cj["response"].strip(),
                              "meta": f"{ci['config']}-vs-{cj['config']}"})
    return [p for p in pairs if p["chosen"] != p["rejected"]]


# -----------------------------------------------------------------------------
# files: append-only jsonl, one record a line, flushed per record, so a killed stage loses at most the record
# being written and a rerun skips what is on disk

def read_records(path):
    """The complete records of a jsonl file ([] if it does not exist). A last line without its newline is what a
    kill mid-write leaves: it is cut off the file (the rerun writes that record again). A malformed line
    elsewhere is an error that names file:line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):                                   # a half-written last record
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not a JSON record ({e}). Fix or delete that line, then rerun: "
                            f"the stage redoes what is missing.") from None
    return records


class RecordWriter:
    """Appends records to a jsonl file, one line each, flushed at once."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record):
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
