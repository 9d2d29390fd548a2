"""
Step 1 of ALMoST: synthetic comparisons from prompted vanilla models, with no human labels. The reward model is
trained on them by rm.py.

    1a  initial queries     query_stream       10-shot prompts from a growing pool; the length rule (bad_query_length)
                                               and the novelty filter (ROUGE-L F1 < 0.5 against the pool, rouge_l)
    1b  prompted responses  answers            every generator (model size x shots x prompt quality) answers every
                                               query; the BAD rules drop failed answers (is_bad_response)
    1c  comparisons         make_comparisons   the rubric's ranking of the generators turned into pairs by the
                                               heuristic length filter (the authors' exact rule)

Two prompt formats: the paper's dialogues ("Human: ... Assistant: ..." after a few-shot prompt file), and the story
format of the bundled models, where a query is a story's opening and a response continues it.
"""
import os
import random
import re
import statistics
import string
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from common import RecordWriter, UserError, derive_seed, model_folder, read_records, read_text, write_json, write_jsonl
from model import free_memory, load
from sample import generate
from tokenizer import TURN_ENDS, dialogue_text, postprocess_response, trim_to_sentence


# -----------------------------------------------------------------------------
# generators, rubric, seed pool and prompt files

@dataclass
class Generator:
    """A prompted model: step 1b's configurations (size x prompt x shots) and step 2's assistant and user."""
    name: str
    model: str              # a model folder
    prompt_file: str        # demonstrations ("" with 0 shots)
    shots: int              # demonstrations in the prompt
    max_new_tokens: int     # the answer's token budget

    def spec(self):
        """As the flags write it: MODEL:PROMPT_FILE:SHOTS:MAX_NEW_TOKENS."""
        return f"{self.model}:{self.prompt_file}:{self.shots}:{self.max_new_tokens}"


def parse_generator(name, spec, fmt):
    """MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS] -> Generator (PROMPT_FILE may be empty with 0 shots)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[2].isdigit() or (len(parts) == 4 and not parts[3].isdigit()):
        raise UserError(f"{name}: {spec!r} is not MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS].")
    model, pfile, shots = model_folder(parts[0], name), parts[1], int(parts[2])
    default_new = 160 if fmt == "story" else (768 if "Faithful" in pfile else 384)   # the paper's budgets
    new = int(parts[3]) if len(parts) == 4 else default_new
    if pfile and not os.path.isfile(pfile):
        raise UserError(f"{name}: prompt file {pfile!r} does not exist.")
    return Generator(name, model, pfile, shots, new)


def parse_generators(spec, fmt):
    if not spec:
        raise UserError("--generators is required for this profile: NAME=MODEL:PROMPT_FILE:SHOTS[:MAX_NEW],... "
                        "e.g. 30b-faithful-3shot=/models/llama-30b:data/almost/Faithful_prompt.txt:3")
    gens = []
    for item in spec.split(","):
        name, eq, rest = item.partition("=")
        if not eq or len(rest.split(":")) not in (3, 4):
            raise UserError(f"--generators: {item!r} is not NAME=MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS].")
        gens.append(parse_generator(f"--generators: {name.strip()}", rest, fmt))
        gens[-1].name = name.strip()
    if len({g.name for g in gens}) < len(gens):
        raise UserError("--generators: two generators share a name.")
    return gens


def parse_rubric(spec, gens):
    """"A>B=C>D" -> ["A", ["B", "C"], "D"]; every name must be a generator."""
    if not spec:
        raise UserError('--rubric is required: generator names best first, e.g. --rubric="A>B=C>D".')
    rubric = [r.split("=") if "=" in r else r for r in (x.strip() for x in spec.split(">"))]
    names = {g.name for g in gens}
    for item in rubric:
        for n in ([item] if isinstance(item, str) else item):
            if n not in names:
                raise UserError(f"--rubric: {n!r} is not one of the generators ({', '.join(sorted(names))}).")
    return rubric


def read_seeds(path):
    """Seed pool file: an instruction line, then one query (or story opening) per line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such seed file. Give --seeds a file: an instruction line, then one query a line.")
    lines = [l.strip() for l in read_text(path, "seed file").splitlines()]
    seeds = [l for l in lines[1:] if l]
    if len(seeds) < 2:
        raise UserError(f"{path}: needs an instruction line and at least two seed lines.")
    return lines[0], seeds


def read_demos(path):
    """A prompt file: a preamble, then demonstrations separated by lines "-----" -> (preamble, [demos])."""
    if not path:
        return "", []
    parts = [p for p in read_text(path, "prompt file").split("\n\n-----") if p.strip("\n ")]
    if not parts:
        raise UserError(f"{path}: an empty prompt file. It holds a preamble, then dialogues, each after a line "
                        f"\"-----\".")
    return parts[0], parts[1:]



# -----------------------------------------------------------------------------
# prompts. The paper's (dialogue) format is text; the story format joins stories with BOS, the way the story
# models saw their training data, so "demonstrations" are simply the previous stories in the context.
def query_prompt(tok, fmt, instruction, shots):
    if fmt == "dialogue":   # 1a: instruction, blank line, "Query: <seed>" lines, then "Query:"
        return tok.encode(f"{instruction}\n\n" + "".join(f"Query: {s}\n" for s in shots) + "Query:", bos=True)
    return [i for s in shots for i in tok.encode(s, bos=True)] + [tok.bos_id]


# 1a as the authors' code reads a sample: the prompt ends with "Query:", so the first generated line finishes that
# query and is never taken; the query is the first line that starts with "Query:" (after stripping), with every
# "Query:" in it removed, then cut at a "query:" / "query :" in any other case. The sampler stops once such a line
# is complete. --query_line=first takes the first line instead (the query the prompt asked for; a model too weak
# to continue the list, like the bundled ones, writes no second "Query:" line), stopping where that line ends.
QUERY_STOPS = {"authors": re.compile(r"^[^\S\n]*Query:.*\n", re.MULTILINE),
               "first": re.compile(r"\S[^\n]*\n|query\s?:", re.IGNORECASE)}
# The story format's opening is settled (extract_query reads no further) once its line has ended, or its first
# sentence has with 30 characters or more, or its second sentence has: the sampler stops there instead of writing the
# rest of a 64-token budget. The queries are the same.
STORY_QUERY_STOP = re.compile(r"\S[^\n]*\n|^\s*(?!\s)(?:(?![.!?]\s)[^\n]){29,}[.!?]\s|[.!?]\s[^\n]*?[.!?]\s")


def extract_query(text, fmt, rule="authors"):
    """1a: a sample -> the query ("" if none). Dialogue: the rule above ("authors" or "first"). Story format: the
    opening is the first sentence, or the first two when the first is shorter than 30 characters."""
    if fmt == "dialogue" and rule == "first":
        line = text.strip("\n ").split("\n")[0]
        return re.split(r"query\s?:", line, flags=re.IGNORECASE)[0].strip()
    if fmt == "dialogue":
        for line in text.split("\n"):
            if line.strip().startswith("Query:"):
                q = re.sub(r"query\s?[:]", "[SEP]", line.replace("Query:", "").strip(), flags=re.IGNORECASE)
                return q.split("[SEP]")[0].strip("\n ")
        return ""
    line = text.strip().split("\n")[0]
    sents = re.findall(r".*?[.!?](?=\s|$)", line)
    q = sents[0].strip() if sents else ""
    if q and len(q) < 30 and len(sents) > 1:
        q = (q + " " + sents[1].strip()).strip()
    return q


def bad_query_length(q, lo=30, hi=250):
    """1a's length filter exactly as the authors' code writes it: a query shorter than 30 characters is dropped
    unless it ends with punctuation, and one longer than 250 is dropped only if it DOES end with punctuation (their
    test is a double negation, `not q[-1] not in punctuation`), so long unfinished queries are kept."""
    return (len(q) < lo and q[-1] not in string.punctuation) or (len(q) > hi and q[-1] in string.punctuation)


def story_so_far(turns):
    return " ".join(t.strip() for _, t in turns)


def dialogue_prompt_text(preamble, demos, shots, turns, role="assistant"):
    """The paper's few-shot dialogue prompt, as the authors' code writes it: the prompt file's preamble and first k
    dialogues, each followed by "\n\n-----" (the preamble too at 0 shots), then the dialogue so far and
    "\n\nAssistant: " with its trailing space (or "\n\nHuman: " for the user's side in self-play)."""
    head = "".join(part + "\n\n-----" for part in [preamble] + demos[:shots]) if preamble or shots else ""
    return head + dialogue_text(turns) + ("\n\nAssistant: " if role == "assistant" else "\n\nHuman: ")


@dataclass
class Speaker:
    """A prompted model that writes the next turn of dialogues: step 1b's generators answer a query, step 2's
    assistant and user take turns. Its prompt (prompt): in the paper's format the prompt file's preamble and first
    `shots` dialogues, then the dialogue so far (dialogue_prompt_text), after BOS; in the story format the
    demonstration stories, each after BOS, then the story so far. (A tokenizer that normalizes whitespace, like the
    bundled one, drops the prompt's trailing space.)"""
    model: object
    tok: object
    fmt: str                 # "dialogue" (the paper's) or "story"
    preamble: str            # the prompt file's preamble ("" in the story format)
    demos: list              # its demonstrations: dialogues, or stories
    shots: int               # demonstrations in the prompt
    max_new_tokens: int      # a turn's token budget
    trim_cut: bool = False   # a dialogue turn the budget cut goes back to its last full sentence (--trim_cut)

    def prompt(self, turns, role="assistant", shots=None):
        """The ids that make the model write the next turn of `role` after `turns` [(role, text)]."""
        shots = self.shots if shots is None else shots
        if self.fmt == "dialogue":
            return self.tok.encode(dialogue_prompt_text(self.preamble, self.demos, shots, turns, role), bos=True)
        return [i for d in self.demos[:shots] for i in self.tok.encode(d.strip(), bos=True)] + \
            self.tok.encode(story_so_far(turns))

    def speak(self, dialogues, role, seed, shots=None):
        """One turn of `role` for each dialogue ([(role, text)] each), sampled with THE sampler at temperature 1 and
        top-p 0.9 (the paper's), stopping where a dialogue turn ends (TURN_ENDS; a story at its EOS) -> texts, None
        where the prompt leaves fewer than 8 tokens of the context window (no room for the turn). A dialogue turn is
        postprocess_response's cut; a story's assistant continues the story (back to its last full sentence when the
        budget cut it), its user adds one sentence."""
        prompts = [self.prompt(turns, role, shots) for turns in dialogues]
        ctx = self.model.config.context
        fit = [i for i, p in enumerate(prompts) if len(p) + 8 <= ctx]
        texts = [None] * len(prompts)
        if not fit:
            return texts
        budget = min(self.max_new_tokens, ctx - max(len(prompts[i]) for i in fit))
        stops = TURN_ENDS if self.fmt == "dialogue" else None          # a story ends at its EOS
        outs, _ = generate(self.model, [prompts[i] for i in fit], budget, temperature=1.0, top_p=0.9, seed=seed,
                           stop_strings=stops, tokenizer=self.tok)
        for i, o in zip(fit, outs):
            t, cut = self.tok.decode(o), len(o) >= budget                # cut: the budget ended it
            if self.fmt == "dialogue":
                cut = cut and not any(s in t for s in TURN_ENDS)
                t = postprocess_response(t)
                t = trim_to_sentence(t) if cut and self.trim_cut else t
            elif role == "assistant":
                t = trim_to_sentence(t.strip()).strip() if cut else t.strip()
            else:
                t = extract_query(t, "story")
            texts[i] = t
        return texts


def speaker(g, model, tok, fmt, trim_cut=False):
    """The Speaker of a Generator (its prompt file read here) on its loaded model."""
    preamble, demos = read_demos(g.prompt_file)
    if g.shots > len(demos):
        raise UserError(f"{g.prompt_file}: {g.name} asks for {g.shots} shots, the file has {len(demos)}.")
    return Speaker(model, tok, fmt, preamble, demos, g.shots, g.max_new_tokens, trim_cut)


# -----------------------------------------------------------------------------
# Step 1a. Initial queries: 10-shot prompts from the growing pool; a query is kept if it passes the length filter
# (bad_query_length) and its ROUGE-L F1 against every query already in the pool is < 0.5 (Self-Instruct's novelty
# filter; the authors' threshold)

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


def is_novel(q_tokens, pool_tokens, threshold=0.5):
    """ROUGE-L F1 < threshold against every pool entry. A cheap upper bound (bag-of-words overlap >= LCS) skips
    most LCS computations."""
    cq = Counter(q_tokens)
    for t in pool_tokens:
        overlap = sum((cq & Counter(t)).values())
        if overlap == 0 or 2 * overlap / (len(q_tokens) + len(t)) < threshold:
            continue
        lcs = lcs_length(q_tokens, t)
        if lcs and 2 * lcs / (len(q_tokens) + len(t)) >= threshold:   # F1 = 2 LCS / (|a| + |b|)
            return False
    return True


class NoveltyPool:
    """The query pool, indexed so that a new query is checked (is_novel) with the exhaustive check's decisions at a
    small cost per query. is_novel's bag-of-words bound skips an entry unless the two token multisets share k tokens
    with 2 k / (|a| + |b|) >= threshold (the LCS is at most the shared count); here that bound is computed for every
    entry at once, and the LCS only for the entries that pass it (2 in 10,000 on bench.py's synthetic queries).
    A multiset is a set of elements (token, occurrence): "the a the" is {(the, 0), (a, 0), (the, 1)}, and two
    multisets share as many tokens as elements. postings[element] lists the entries that hold it (ids ascending),
    so the shared counts of the whole pool are one bincount over the query's elements' lists: a C loop over the
    postings, about 10 ns an entry, where checking each entry in Python costs microseconds."""

    def __init__(self, threshold=0.5):
        self.threshold, self.entries = threshold, []
        self.lengths, self.postings = array("i"), {}   # entry lengths; element -> array of entry ids

    @staticmethod
    def elements(tokens):
        seen = Counter()
        for t in tokens:
            yield t, seen[t]
            seen[t] += 1

    def add(self, tokens):
        i = len(self.entries)
        self.entries.append(tokens)
        self.lengths.append(len(tokens))
        for e in self.elements(tokens):
            self.postings.setdefault(e, array("i")).append(i)

    def candidates(self, tokens):
        """Ids of the entries that pass is_novel's bag-of-words bound: shared > 0 and 2 shared / (m + n) >= t."""
        lists = [np.frombuffer(self.postings[e], dtype=np.intc) for e in self.elements(tokens) if e in self.postings]
        if not lists:
            return []
        shared = np.bincount(np.concatenate(lists), minlength=len(self.entries))      # (N,) tokens shared
        n = np.frombuffer(self.lengths, dtype=np.intc)                                 # (N,) entry lengths
        return np.flatnonzero((shared > 0) & (2 * shared / (len(tokens) + n) >= self.threshold)).tolist()

    def is_novel(self, tokens):
        m = len(tokens)
        for i in self.candidates(tokens):
            t = self.entries[i]
            if 2 * lcs_length(tokens, t) / (m + len(t)) >= self.threshold:                 # is_novel's test
                return False
        return True
def sample_queries(model, tok, fmt, rule, instruction, pool, rng, rows, per_prompt):
    """1a, one sampler call: `rows` samples at temperature 1.2 and top-p 0.9 (the authors'), each continuing a 10-shot
    prompt of queries drawn from `pool` (query_prompt; a draw serves per_prompt samples, whose common prompt the
    sampler computes once), stopped where the query is complete -> the query of each sample (extract_query)."""
    prompts = []
    while len(prompts) < rows:
        prompts += [query_prompt(tok, fmt, instruction, rng.sample(pool, min(10, len(pool))))] * per_prompt
    prompts = prompts[:rows]
    budget = min(64, model.config.context - max(map(len, prompts)))
    if budget < 16:
        raise UserError(f"queries: a 10-shot query prompt of {max(map(len, prompts))} tokens leaves no room in the "
                        f"context window ({model.config.context}): use shorter seeds or a model with a longer context.")
    stop = QUERY_STOPS[rule] if fmt == "dialogue" else STORY_QUERY_STOP
    outs, _ = generate(model, prompts, budget, temperature=1.2, top_p=0.9, seed=rng.randrange(2**31),
                       stop_strings=[stop], tokenizer=tok)
    return [extract_query(tok.decode(o), fmt, rule) for o in outs]


def query_rejection(q, novelty):
    """Why 1a drops a query ("empty", "length": bad_query_length, "overlap": ROUGE-L >= 0.5 against the pool), or
    None when it is kept."""
    qt = rouge_tokens(q)
    return "empty" if not qt else "length" if bad_query_length(q) else "overlap" if not novelty.is_novel(qt) else None


def query_stream(model, tok, fmt, rule, instruction, pool, novelty, rng, rows, per_prompt):
    """1a as a stream: rounds of `rows` samples (sample_queries) whose shots are drawn from `pool`; a sample that
    query_rejection passes joins `pool` and `novelty` (a NoveltyPool) -> yields (query, None) for it, (query, the
    reason) for one dropped, for ever."""
    while True:
        for q in sample_queries(model, tok, fmt, rule, instruction, pool, rng, rows, per_prompt):
            reason = query_rejection(q, novelty)
            if reason is None:
                pool.append(q)
                novelty.add(rouge_tokens(q))
            yield q, reason


def stage_queries(cfg):
    """1a: the self-play queries (queries.jsonl; the last 10% held out), then the RL prompts (rl_queries.jsonl): a
    second set made the same way, novel against every query of the first (the paper's figure 1), so PPO optimises on
    prompts that the SFT demonstrations never answered."""
    queries_file(cfg, "queries.jsonl", cfg.n_queries, others="rl_queries.jsonl")
    queries_file(cfg, "rl_queries.jsonl", cfg.n_rl_queries, others="queries.jsonl")


def queries_file(cfg, name, n, others):
    """The queries of query_stream into {out}/name until it holds n, a record each as it is kept (novel against the
    seeds, this set and `others`); a rerun goes on from what is on disk."""
    path = os.path.join(cfg.out, name)
    done = read_records(path)
    if len(done) >= n:
        print(f"queries: {len(done)} already in {path}, skipping")
        return
    instruction, seeds = read_seeds(cfg.seeds)
    model, tok = load(cfg.query_model, device=cfg.device)
    pool = seeds + [r["query"] for r in done]
    novelty = NoveltyPool()
    for q in pool + [r["query"] for r in read_records(os.path.join(cfg.out, others))]:
        novelty.add(rouge_tokens(q))
    rng = random.Random(derive_seed(cfg.seed, name.removesuffix(".jsonl"), len(done)))
    rejected = {"empty": 0, "length": 0, "overlap": 0}
    tries, n_new = 0, 0
    stream = query_stream(model, tok, cfg.format, cfg.query_line, instruction, pool, novelty, rng, cfg.batch_size,
                          cfg.queries_per_prompt)
    with RecordWriter(path) as w, tqdm(total=n, initial=len(done), desc=name.removesuffix(".jsonl")) as bar:
        for q, reason in stream:
            tries += 1
            if tries > 50 * n:
                hint = (" Most samples had no line starting with \"Query:\" (the authors' rule takes the second query "
                        "a model writes): --query_line=first takes the first." if cfg.format == "dialogue" and
                        cfg.query_line == "authors" and rejected["empty"] > tries // 2 else "")
                flag = "--n_queries" if name == "queries.jsonl" else "--n_rl_queries"
                raise UserError(f"queries: only {len(done) + n_new} of {n} accepted into {path} after {tries - 1} "
                                f"samples ({rejected}). Lower {flag} or add seeds to {cfg.seeds}.{hint}")
            if reason:
                rejected[reason] += 1
                continue
            w.write({"id": len(done) + n_new, "query": q})
            n_new += 1
            bar.update(1)
            if len(done) + n_new >= n:
                break
    print(f"queries: {n_new} new ({tries} samples; rejected: {rejected}) -> {path}")

# -----------------------------------------------------------------------------
# Step 1b. Prompted responses: every generator config answers every query; the BAD rules drop failed answers

def is_bad_response(text):
    """1b's BAD rules, as the authors' code: a response is BAD (dropped) if it is shorter than 50 characters, ends
    with "?" or ":", starts with "well" (any case), does not end with "." or "!", says "don't know" / "do not know"
    (straight or curly apostrophe, any case), or contains "Human:" or "<Image>" (any case)."""
    t = text.strip("\n ")
    return (len(t) < 50 or t.endswith(("?", ":")) or t.lower().startswith("well") or t[-1] not in ".!"
            or re.search(r"(don('|\u2019)t|do not)\s+know", t, flags=re.IGNORECASE) is not None
            or re.search(r"Human[:]", t, flags=re.IGNORECASE) is not None
            or re.search(r"[<]Image[>]", t, flags=re.IGNORECASE) is not None)


def answers(speaker, queries, seed, batch_size):
    """1b: the speaker's answer to each query ({"id", "query"}; "" where its prompt leaves no room), in batches of
    prompts of similar length, a batch seeded by seed + its first query's id -> yields [(query, answer)] a batch."""
    lengths = {q["id"]: len(speaker.prompt([("user", q["query"])])) for q in queries}
    queries = sorted(queries, key=lambda q: lengths[q["id"]])           # similar lengths batch together
    for b in range(0, len(queries), batch_size):
        batch = queries[b:b + batch_size]
        texts = speaker.speak([[("user", q["query"])] for q in batch], "assistant", (seed + batch[0]["id"]) % 2**31)
        yield [(q, t or "") for q, t in zip(batch, texts)]


def stage_responses(cfg):
    """1b: every generator's answer to every query (answers), a record each with its BAD mark (is_bad_response),
    appended to responses.jsonl; one model in memory at a time; a rerun answers what is not on disk."""
    queries = read_records(os.path.join(cfg.out, "queries.jsonl"))[:cfg.n_queries]
    if not queries:
        raise UserError(f"{cfg.out}/queries.jsonl is empty or missing: run the queries stage first "
                        f"(--stages=queries,responses).")
    gens = parse_generators(cfg.generators, cfg.format)
    path = os.path.join(cfg.out, "responses.jsonl")
    done = {(r["query_id"], r["config"]) for r in read_records(path)}
    loaded, model, tok, sp = None, None, None, None
    with RecordWriter(path) as w:
        for g in gens:
            todo = [q for q in queries if (q["id"], g.name) not in done]
            if not todo:
                print(f"responses: {g.name}: all {len(queries)} on disk, skipping")
                continue
            if g.model != loaded:   # one model in memory at a time: the last one goes before the next loads
                model = tok = sp = None   # (the speaker holds its model too)
                free_memory()
                model, tok = load(g.model, device=cfg.device)
                loaded = g.model
            sp = speaker(g, model, tok, cfg.format, cfg.trim_cut)
            longest, ctx = max(len(sp.prompt([("user", q["query"])])) for q in todo), model.config.context
            if longest >= ctx:
                raise UserError(f"{g.name}: a prompt of {longest} tokens does not fit the context window ({ctx}) "
                                f"of {g.model}: use fewer shots.")
            if longest + g.max_new_tokens > ctx:   # as vLLM does: the budget stops at the context window
                print(f"note: {g.name}: the longest prompt ({longest} tokens) leaves {ctx - longest} of the "
                      f"{g.max_new_tokens} new tokens inside the context window ({ctx}); longer answers are cut")
            seed = derive_seed(cfg.seed, "sampling", zlib.crc32(g.name.encode()), bits=31)
            for batch in tqdm(answers(sp, todo, seed, cfg.batch_size), total=-(-len(todo) // cfg.batch_size),
                              desc=f"responses {g.name}"):
                for q, resp in batch:
                    w.write({"query_id": q["id"], "query": q["query"], "config": g.name, "response": resp,
                             "bad": is_bad_response(resp)})
    print(f"responses -> {path}")


# -----------------------------------------------------------------------------
# Step 1c. Synthetic comparisons: the rubric's ranking of the configs turned into pairs by the heuristic
# filter (the exact rule of the authors' code, plus dropping identical pairs)

def rubric_ranks(rubric):
    """rubric: config names best first; an item may be a list of names that share a rank.
    -> {name: (rank, position in the flattened rubric)}"""
    ranks, pos = {}, 0
    for level, item in enumerate(rubric):
        for name in ([item] if isinstance(item, str) else item):
            if name in ranks:
                raise UserError(f"rubric: config {name!r} appears twice.")
            ranks[name] = (level, pos)
            pos += 1
    return ranks


def make_comparisons(responses, rubric, length_filter=True):
    """responses: dicts {"query", "config", "response"}; rubric: config names best first (an item may be a list
    of names sharing a rank). Returns {"prompt", "chosen", "rejected", "meta"} dicts in the order the rule walks,
    queries in first-seen order. Per query, over its non-BAD responses:
      - fewer than 2: no pairs; else sort by rank, best first (tied configs keep rubric order);
      - M, S = mean and population std of their lengths; a response is long enough iff len >= M - S/2;
      - walk the index pairs (i < j) in order and emit chosen=i, rejected=j unless they share a rank, or i's
        rank already gave a chosen for this query, or len(chosen) < len(rejected) and chosen is not long enough.
    So at most K-1 pairs a query; a too-short better answer is paired with the next worse one shorter than it.
    Pairs whose two texts are identical are dropped at the end. length_filter=False drops the length rule (for
    the ablation: then every query gives the K-1 pairs of neighbouring ranks)."""
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
                if length_filter and lengths[i] < lengths[j] and lengths[i] < long_enough:
                    continue
                used.add(ri)
                pairs.append({"prompt": query, "chosen": ci["response"].strip(), "rejected": cj["response"].strip(),
                              "meta": f"{ci['config']}-vs-{cj['config']}"})
    return [p for p in pairs if p["chosen"] != p["rejected"]]


def stage_compare(cfg):
    gens = parse_generators(cfg.generators, cfg.format)
    rubric = parse_rubric(cfg.rubric, gens)
    names = {n for item in rubric for n in ([item] if isinstance(item, str) else item)}
    rs = [r for r in read_records(os.path.join(cfg.out, "responses.jsonl")) if r["config"] in names]
    if not rs:
        raise UserError(f"{cfg.out}/responses.jsonl has no responses of the rubric's configs: run the responses "
                        f"stage first.")
    pairs = make_comparisons(rs, rubric)
    unfiltered = make_comparisons(rs, rubric, length_filter=False)
    write_jsonl(os.path.join(cfg.out, "comparisons.jsonl"), pairs)
    write_jsonl(os.path.join(cfg.out, "comparisons_nofilter.jsonl"), unfiltered)
    per_config = {n: [r for r in rs if r["config"] == n] for n in sorted(names)}
    stats = {"responses": len(rs), "queries": len({r["query_id"] for r in rs}),
             "bad_rate": {n: sum(r["bad"] for r in v) / max(1, len(v)) for n, v in per_config.items()},
             "mean_chars_good": {n: statistics.fmean([len(r["response"]) for r in v if not r["bad"]] or [0])
                                 for n, v in per_config.items()},
             "pairs": len(pairs), "pairs_without_length_rule": len(unfiltered),
             "pairs_per_rank_pair": dict(Counter(p["meta"] for p in pairs)),
             "pairs_per_rank_pair_without_length_rule": dict(Counter(p["meta"] for p in unfiltered)),
             "chosen_longer_rate": sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / max(1, len(pairs))}
    write_json(os.path.join(cfg.out, "compare_stats.json"), stats)
    print(f"compare: {len(pairs)} pairs ({len(unfiltered)} without the length rule) from {stats['queries']} "
          f"queries; BAD rate " + ", ".join(f"{n} {v:.0%}" for n, v in stats["bad_rate"].items()))
    for m, c in stats["pairs_per_rank_pair"].items():
        print(f"  {m}: {c}")
