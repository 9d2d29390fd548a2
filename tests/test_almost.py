"""almost.py, step 1 rules: ROUGE-L, post-processing, the BAD rules, the comparison rule, resumable jsonl."""
import pytest

from almost import (RecordWriter, is_bad_response, make_comparisons, postprocess_response, read_records, rouge_l)
from model import UserError


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


def test_postprocess_response():
    assert postprocess_response(" Sure, here it is.\n\nHuman: thanks") == "Sure, here it is."
    assert postprocess_response(" An answer.\n\n-----\n\nHuman: next") == "An answer."
    assert postprocess_response(" First.\n\nAssistant: again") == "First."


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
    ("I DON\u2019T   KNOW, but " + GOOD, True),                        # any apostrophe, any case, any spacing
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


def test_records_resume_without_duplicates_or_losses(tmp_path):
    path = str(tmp_path / "out" / "responses.jsonl")
    with RecordWriter(path) as w:
        for i in range(3):
            w.write({"id": i})
    with open(path, "a") as f:                     # a kill in the middle of writing record 3
        f.write('{"id": 3, "resp')
    done = read_records(path)
    assert [r["id"] for r in done] == [0, 1, 2]
    with RecordWriter(path) as w:                  # the rerun writes what is missing
        for i in range(5):
            if i not in {r["id"] for r in done}:
                w.write({"id": i})
    assert [r["id"] for r in read_records(path)] == [0, 1, 2, 3, 4]
    assert read_records(str(tmp_path / "none.jsonl")) == []
    with open(path, "a") as f:
        f.write("not json\n")
        f.write('{"id": 5}\n')
    with pytest.raises(UserError, match=r"responses\.jsonl:6"):
        read_records(path)
