"""comparisons.py, step 1: ROUGE-L and the novelty filter, the query prompts and rules, the BAD rules, the comparison
rule, and the queries and responses stages (resumable; the RL prompts a set of their own)."""
import os
from collections import Counter

import pytest

import almost
import comparisons
from almost import Config, resolve
from common import UserError, read_records
from comparisons import is_bad_response, make_comparisons, rouge_l
from conftest import ROOT, interrupt_after, tiny


# -----------------------------------------------------------------------------
# ROUGE-L, the BAD rules, the comparison rule

def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 and 6 tokens: P = R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b d" = 2: P = 2/4, R = 2/2, F = 2 * 0.5 * 1 / 1.5
    assert rouge_l("A B C D", "B D") == pytest.approx(2 / 3)
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)          # order matters: LCS 1
    assert rouge_l("Hello, World!", "hello world") == 1.0             # lowercase word tokens, punctuation ignored
    assert rouge_l("one two", "three four") == 0.0
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("How do I bake bread at home?", "How can I bake bread?") == pytest.approx(2 * (4 / 7) * (4 / 5) / (4 / 7 + 4 / 5))


GOOD = "This is a perfectly fine answer that is long enough to keep."


@pytest.mark.parametrize("text,bad", [
    (GOOD, False),
    (GOOD.replace(".", "!"), False),
    ("Too short.", True),                                              # < 50 characters
    (GOOD[:-1] + "?", True),
    (GOOD[:-1] + ":", True),
    (GOOD[:-1], True),                                                 # does not end with . or !
    ("Well, " + GOOD, True),
    ("WELL " + GOOD, True),
    ("I don't know, but " + GOOD, True),
    ("I DON\u2019T   KNOW, but " + GOOD, True),                        # a curly apostrophe, any case, any spacing
    ("I don`t know, but " + GOOD, False),                              # the authors' rule knows two apostrophes
    ("Well" + GOOD, True),                                             # "starts with well", as written
    ("  " + GOOD + "\n", False),                                       # judged after stripping
    ("We do not know yet; " + GOOD, True),
    ("I know that " + GOOD, False),
    ("Answer. Human: " + GOOD, True),
    ("See <image> " + GOOD, True),
])
def test_bad_rules(text, bad):
    assert is_bad_response(text) is bad


def resp(query, config, n):
    """A non-BAD response of exactly n characters."""
    return {"query": query, "config": config, "response": (config * n)[:n - 1] + "."}


def metas(pairs):
    return [p["meta"] for p in pairs]


def test_one_chosen_per_rank_and_k_minus_1_pairs():
    rs = [resp("q", c, 100) for c in "ABCD"]
    assert metas(make_comparisons(rs, ["A", "B", "C", "D"])) == ["A-vs-B", "B-vs-C", "C-vs-D"]


def test_ties_share_a_rank():
    rs = [resp("q", "A", 100), resp("q", "B", 100), resp("q", "C", 100)]
    # A and B tie: no A-vs-B; A is chosen once, and then B (same rank as A) may not be chosen
    assert metas(make_comparisons(rs, [["A", "B"], "C"])) == ["A-vs-C"]
    # tied configs keep rubric order, whatever the input order
    assert metas(make_comparisons(rs[::-1], [["B", "A"], "C"])) == ["B-vs-C"]


def test_short_chosen_outside_the_band_pairs_with_the_next_shorter():
    # lengths 60, 200, 55, 190: M = 126.25, S = 68.86, M - S/2 = 91.8. A and C are too short to beat longer ones.
    rs = [resp("q", "A", 60), resp("q", "B", 200), resp("q", "C", 55), resp("q", "D", 190)]
    assert metas(make_comparisons(rs, ["A", "B", "C", "D"])) == ["A-vs-C", "B-vs-C"]


def test_short_chosen_inside_the_band_still_wins():
    # lengths 108, 120, 100: M = 109.33, S = 8.22, M - S/2 = 105.2 <= 108: A is long enough
    rs = [resp("q", "A", 108), resp("q", "B", 120), resp("q", "C", 100)]
    assert metas(make_comparisons(rs, ["A", "B", "C"])) == ["A-vs-B", "B-vs-C"]


def test_fewer_than_two_good_responses_and_bad_ones_left_out():
    rs = [resp("q1", "A", 100), {"query": "q1", "config": "B", "response": "Short."}]
    assert make_comparisons(rs, ["A", "B"]) == []
    # BAD responses count neither as candidates nor in M and S. Good lengths 90, 100, 60: M = 83.3, S = 17.0,
    # M - S/2 = 74.8, so A (90) is long enough to beat C (100). Were B's BAD 1001 characters counted,
    # M - S/2 would be 119.4 and A would be paired with D instead.
    bad = {"query": "q2", "config": "B", "response": "y" * 1000 + "?"}
    rs = [resp("q2", "A", 90), bad, resp("q2", "C", 100), resp("q2", "D", 60)]
    assert metas(make_comparisons(rs, ["A", "B", "C", "D"])) == ["A-vs-C", "C-vs-D"]


def test_records_and_query_order():
    rs = [resp("second", "B", 100), resp("first", "A", 100), resp("second", "A", 100), resp("first", "B", 90)]
    pairs = make_comparisons(rs, ["A", "B"])
    assert [(p["prompt"], p["meta"]) for p in pairs] == [("second", "A-vs-B"), ("first", "A-vs-B")]
    assert set(pairs[0]) == {"prompt", "chosen", "rejected", "meta"}
    same = [resp("q", "A", 100), {**resp("q", "A", 100), "config": "B"}]   # identical texts: dropped
    assert make_comparisons(same, ["A", "B"]) == []
    with pytest.raises(UserError, match="'Z' is not in the rubric"):
        make_comparisons([resp("q", "Z", 100)], ["A"])


# -----------------------------------------------------------------------------
# the few-shot prompts and the authors' query rules

def test_prompt_formats(stories):
    from comparisons import Speaker, dialogue_prompt_text, extract_query, query_prompt, read_demos
    from tokenizer import trim_to_sentence
    model, tok = stories
    pre, demos = read_demos(os.path.join(ROOT, "data", "almost", "HHH_prompt.txt"))
    assert len(demos) == 14 and pre.startswith("Below are a series of dialogues")
    p = tok.decode(Speaker(model, tok, "dialogue", pre, demos, 1, 64).prompt([("user", "How are you?")]))
    assert p.endswith("\n\n-----\n\nHuman: How are you?\n\nAssistant:") and p.count("-----") == 2
    text = open(os.path.join(ROOT, "data", "almost", "HHH_prompt.txt"), encoding="utf-8").read()
    two = dialogue_prompt_text(pre, demos, 2, [("user", "How are you?")])
    assert two == "\n\n-----".join(text.split("\n\n-----")[:3]) + "\n\n-----\n\nHuman: How are you?\n\nAssistant: "
    assert dialogue_prompt_text(pre, demos, 0, [("user", "Hi?")]) == pre + "\n\n-----\n\nHuman: Hi?\n\nAssistant: "
    ids = Speaker(model, tok, "story", "", ["Story one.", "Story two."], 2, 64).prompt([("user", "Once upon a time.")])
    assert ids.count(tok.bos_id) == 3 and tok.decode(ids) == "Story one. Story two. Once upon a time."
    assert tok.decode(query_prompt(tok, "dialogue", "Make queries.", ["a?", "b?"], )) == "Make queries.\n\nQuery: a?\nQuery: b?\nQuery:"
    # as the authors' code: every "Query:" in the line is removed first; only another case ("query:") cuts it
    assert extract_query(" ignored\nQuery: What is X? Query: next\nQuery: more", "dialogue") == "What is X?  next"
    assert extract_query(" What is X? query : next\nQuery: more", "dialogue", "first") == "What is X?"
    assert extract_query("Tom ran. He saw a dog. Then more.", "story") == "Tom ran. He saw a dog."
    assert extract_query("Once upon a time, there was a big red car. It was fast.", "story") == \
        "Once upon a time, there was a big red car."
    assert trim_to_sentence('He ran. She said, "Stop." Then the dog') == "He ran."


def synthetic_queries(n, seed=0):
    """Query-like word strings: a Zipf-like vocabulary of common and rare words, and many near-copies of earlier
    queries (a word changed, added or dropped), so that the ROUGE-L filter has both kinds of work."""
    import random
    rng = random.Random(seed)
    common = "what how is the a to of in can i you do for my and why best way should".split()
    rare = [f"w{i}" for i in range(3000)]
    out = []
    for _ in range(n):
        if out and rng.random() < 0.4:
            words = rng.choice(out).split()
            i = rng.randrange(len(words))
            op = rng.random()
            if op < 0.4:
                words[i] = rng.choice(rare)
            elif op < 0.7:
                words.insert(i, rng.choice(common))
            elif len(words) > 2:
                del words[i]
        else:
            words = [rng.choice(common) if rng.random() < 0.5 else rare[min(int(rng.paretovariate(0.8)), 2999)]
                     for _ in range(rng.randint(3, 14))]
        out.append(" ".join(words))
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.3])
def test_indexed_novelty_filter_decides_as_the_exhaustive_check(threshold):
    from comparisons import NoveltyPool, is_novel, rouge_tokens
    pool, exhaustive = NoveltyPool(threshold), []
    decisions = []
    for k, q in enumerate(synthetic_queries(3000)):
        t = rouge_tokens(q)
        want = is_novel(t, exhaustive, threshold)
        assert pool.is_novel(t) == want, q
        if k % 50 == 0:   # the candidates are exactly the entries that pass is_novel's bag-of-words bound
            shared = [sum((Counter(t) & Counter(e)).values()) for e in exhaustive]
            assert pool.candidates(t) == [i for i, (s, e) in enumerate(zip(shared, exhaustive))
                                          if s and 2 * s / (len(t) + len(e)) >= threshold]
        decisions.append(want)
        if want:
            pool.add(t)
            exhaustive.append(t)
    assert 50 < sum(decisions) < 2950                                  # both outcomes, many times


@pytest.mark.parametrize("sample,query", [
    (" How do I bake bread?\nQuery: What is a good name for a cat?\nQuery: more", "What is a good name for a cat?"),
    (" the first line finishes the prompt's query and is never taken", ""),
    ("Query: a line of its own counts", "a line of its own counts"),
    (" x\n   Query:   spaces around it  \n", "spaces around it"),
    (" x\nQuery: two queries query : in one line", "two queries"),
    (" x\nQuery: Query: twice", "twice"),
    (" x\nQUERY: upper case is not the prefix\nQuery: this one", "this one"),
    (" x\nSo Query: not at the start\nQuery: kept", "kept"),
])
def test_extract_query_as_the_authors(sample, query):
    """1a's query extraction on the edge cases of the authors' rule (the first line that starts with "Query:")."""
    from comparisons import extract_query
    assert extract_query(sample, "dialogue") == query


@pytest.mark.parametrize("q,bad", [
    ("Why?", False),                              # short, but ends with punctuation: kept
    ("How do I bake bread", True),                # short without punctuation: dropped
    ("x" * 30, False), ("x" * 249 + ".", False),  # the window's ends
    ("x" * 251, False),                           # long without punctuation: kept (the authors' double negation)
    ("x" * 250 + "?", True),                      # long with punctuation: dropped
])
def test_query_length_filter_as_the_authors(q, bad):
    from comparisons import bad_query_length
    assert bad_query_length(q) is bad


def test_the_story_stop_rule_never_changes_the_opening():
    """The sampler stops a story query at the first point where STORY_QUERY_STOP matches the text so far; what
    extract_query takes from that prefix must equal what it takes from the whole sample. Every prefix of random
    texts made of sentence pieces, terminators, spaces and newlines is checked, character by character (a token
    boundary can fall anywhere)."""
    import random
    from comparisons import STORY_QUERY_STOP, extract_query
    rng = random.Random(0)
    pieces = ["Once upon a time", " there was a dog", "Tim", " ran", ".", "!", "?", " ", "\n", "3.5", "!!", " Yes.",
              " a very long sentence that goes on and on", "\n\n", "  "]
    stopped = 0
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        cut = next((i for i in range(1, len(text) + 1) if STORY_QUERY_STOP.search(text[:i])), None)
        if cut is not None:
            stopped += 1
            assert extract_query(text[:cut], "story") == extract_query(text, "story"), (text, cut)
    assert stopped > 10000


def test_trim_cut_takes_a_budget_cut_turn_back_to_its_last_sentence(stories, monkeypatch):
    """--trim_cut (the chat profile): a dialogue turn that ran into the token budget keeps its full sentences; a
    turn that ended at a turn marker, or without --trim_cut, is kept as the authors' post-processing leaves it."""
    model, tok = stories
    cut = tok.encode("The dog ran home. Then it sat down and")
    ended = tok.encode("The dog ran home. Then it sat down\n\nHuman: and")
    outs = {}
    monkeypatch.setattr(comparisons, "generate", lambda m, prompts, budget, **kw: ([outs["ids"][:budget]], None))
    for ids, trim, want in ((cut, True, "The dog ran home."), (cut, False, tok.decode(cut).strip()),
                            (ended, True, tok.decode(ended).split("\n\nHuman:")[0].strip())):
        outs["ids"] = ids
        prompted = comparisons.Speaker(model, tok, "dialogue", "", [], 0, len(ids), trim_cut=trim)
        assert prompted.speak([[("user", "Where did the dog go?")]], "assistant", 0) == [want]


# -----------------------------------------------------------------------------
# the queries and responses stages

def test_one_query_prompt_serves_queries_per_prompt_rows(tmp_path, monkeypatch):
    """--queries_per_prompt=k: each draw of 10 shots is the prompt of k rows of a sampler call (the story profile's
    32: one prompt per call, computed once); 1 draws the shots for every row, as the authors."""
    seen = []

    def spy(model, prompts, *a, **k):
        seen.append(prompts)
        return [[] for _ in prompts], [[] for _ in prompts]    # empty samples: rejected, so the stage gives up
    monkeypatch.setattr(comparisons, "generate", spy)
    for k, distinct in ((4, 2), (1, 8)):
        cfg = tiny(tmp_path / str(k), batch_size=8, queries_per_prompt=k)
        seen.clear()
        with pytest.raises(UserError, match="only 0 of 6 accepted"):
            comparisons.queries_file(cfg, "queries.jsonl", 6, others="rl_queries.jsonl")
        assert seen and all(len(p) == 8 and len({tuple(x) for x in p}) == distinct for p in seen)
    assert tiny(tmp_path / "d").queries_per_prompt == 32 and \
        resolve(Config(profile="paper", out=str(tmp_path / "p"))).queries_per_prompt == 1


@pytest.mark.slow
def test_interrupted_stages_resume_with_no_duplicate_and_no_missing_record(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    with monkeypatch.context() as m:
        interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            almost.stage_queries(cfg)
    partial = read_records(os.path.join(cfg.out, "queries.jsonl"))
    assert len(partial) < cfg.n_queries
    almost.stage_queries(cfg)
    queries = read_records(os.path.join(cfg.out, "queries.jsonl"))
    assert [q["id"] for q in queries] == list(range(cfg.n_queries))
    assert queries[:len(partial)] == partial                      # nothing already written was redone
    assert len({q["query"] for q in queries}) == cfg.n_queries

    with monkeypatch.context() as m:
        interrupt_after(m, 4)                                      # dies inside the second generator
        with pytest.raises(KeyboardInterrupt):
            almost.stage_responses(cfg)
    path = os.path.join(cfg.out, "responses.jsonl")
    with open(path, "a") as f:                                     # and a record half written
        f.write('{"query_id": 5, "config": "50K-0')
    n_before = len(read_records(path))
    assert 0 < n_before < 4 * cfg.n_queries
    almost.stage_responses(cfg)
    rs = read_records(path)
    keys = [(r["query_id"], r["config"]) for r in rs]
    assert len(keys) == len(set(keys)) == 4 * cfg.n_queries     # 4 generators x 6 queries, each once
    assert all(isinstance(r["bad"], bool) and r["query"] == queries[r["query_id"]]["query"] for r in rs)
    almost.stage_responses(cfg)                                    # a third run has nothing to do
    assert len(read_records(path)) == 4 * cfg.n_queries


@pytest.mark.slow
def test_rl_prompts_are_their_own_set(tmp_path):
    """1a makes the RL prompts as a second set (rl_queries.jsonl) by the same rules, novel against every self-play
    query, so PPO never optimises on a prompt that SFT's demonstrations answered, and the held-out queries stay
    unseen. Without them the ppo stage says which stage makes them."""
    cfg = tiny(tmp_path, n_queries=8, n_rl_queries=8)
    almost.stage_queries(cfg)
    sp = [q["query"] for q in read_records(os.path.join(cfg.out, "queries.jsonl"))]
    rl = [q["query"] for q in read_records(os.path.join(cfg.out, "rl_queries.jsonl"))]
    assert len(sp) == len(rl) == 8 and not set(sp) & set(rl)
    assert max(comparisons.rouge_l(a, b) for a in sp for b in rl) < 0.5
    os.remove(os.path.join(cfg.out, "rl_queries.jsonl"))
    with pytest.raises(almost.UserError, match="holds 0 of --n_rl_queries=8 RL prompts: run the queries stage"):
        almost.stage_ppo(cfg)


@pytest.mark.slow
def test_queries_stage_on_a_chat_model_takes_the_authors_query_line(smollm2, tmp_path):
    """1a on a real chat model with the authors' rule: every kept query is a whole "Query:" line the model wrote,
    the sampler stopped right after that line, and the length filter holds."""
    import almost
    from model import load
    from sample import generate
    model, tok = load(smollm2)
    instruction, seeds = comparisons.read_seeds(os.path.join(ROOT, "data", "almost", "seed_prompts.txt"))
    prompts = [comparisons.query_prompt(tok, "dialogue", instruction, seeds[i:i + 10]) for i in range(0, 80, 10)]
    outs, _ = generate(model, prompts, 64, temperature=1.2, top_p=0.9, seed=3,
                       stop_strings=[comparisons.QUERY_STOPS["authors"]], tokenizer=tok)
    texts = [tok.decode(o) for o in outs]
    found = [(t, comparisons.extract_query(t, "dialogue")) for t in texts]
    assert any(q for _, q in found), texts
    for (t, q), o in zip(found, outs):
        if q and t.endswith("\n"):   # the line is complete and nothing was generated past the token that ended it
            assert not tok.decode(o[:-1]).endswith("\n") and ("Query: " + q) in t
        else:   # the budget or EOS ended it before the stop string: no complete "Query:" line was passed over
            assert not comparisons.QUERY_STOPS["authors"].search(t) and (not q or ("Query: " + q) in t)
    cfg = almost.Config(profile="paper", out=str(tmp_path), n_queries=3, n_rl_queries=2, query_model=smollm2,
                        batch_size=8, device="cpu")
    almost.resolve(cfg)
    almost.stage_queries(cfg)
    qs = read_records(str(tmp_path / "queries.jsonl"))
    assert len(qs) == 3 and all(not comparisons.bad_query_length(q["query"]) for q in qs)
