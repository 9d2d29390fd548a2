"""selfplay.py: the best-of-n turn the reward model picks, a resumable self-play stage, and turns with no room left."""
import json
import os

import pytest

import almost
import selfplay
from almost import Config, resolve
from common import read_records
from conftest import ROOT, interrupt_after, tiny


def test_best_of_n_turn_keeps_the_reward_models_favourite_that_is_not_bad():
    """Each dialogue's n candidates are scored given that dialogue so far; the highest that is not BAD becomes its
    turn (a higher BAD one never wins), every candidate is recorded with its score, and a dialogue whose candidates
    are all BAD ends without a turn."""
    import torch
    from selfplay import Dialogue, best_of_n_turn
    from tokenizer import dialogue_text

    class Scorer:   # the reward model's interface: the number a candidate ends with is its score
        def score(self, prompts, responses):
            self.seen = list(zip(prompts, responses))
            return torch.tensor([float(r.rstrip(".").split()[-1]) for r in responses])

    good = "This is a long and complete answer that the rules keep, scored {}."
    bad = "Well, this answer starts with a word the rules drop, scored {}."
    d1, d2, d3 = (Dialogue(i, q, [("user", q)]) for i, q in enumerate(("How are you?", "Why?", "Where?")))
    cands = [good.format(1), bad.format(9), good.format(3), good.format(2),      # d1: 3 wins over BAD 9
             bad.format(5), bad.format(6), bad.format(7), bad.format(8),         # d2: all BAD
             good.format(-2), good.format(-1), good.format(-3), good.format(-4)]  # d3: -1 wins
    rm = Scorer()
    best_of_n_turn([d1, d2, d3], cands, rm, 4)
    assert [p for p, _ in rm.seen] == [dialogue_text(d.turns[:1]) for d in (d1, d2, d3) for _ in range(4)]
    assert d1.turns[-1] == ("assistant", good.format(3)) and d3.turns[-1] == ("assistant", good.format(-1))
    assert d2.ended and len(d2.turns) == 1 and not d1.ended
    assert [c["score"] for c in d1.candidates[0]] == [1, 9, 3, 2] and [c["bad"] for c in d1.candidates[0]] == \
        [False, True, False, False]
    assert [c.get("chosen", False) for c in d1.candidates[0]] == [False, False, True, False]


@pytest.mark.slow
def test_selfplay_interrupted_resumes_without_duplicates(tmp_path, monkeypatch):
    from rm import RewardModel
    cfg = tiny(tmp_path, n_queries=12, batch_size=4, n=2, selfplay_baseline=False)
    almost.stage_queries(cfg)
    rm_dir = tmp_path / "rm"
    RewardModel.from_pretrained(os.path.join(ROOT, "data", "stories260K")).save_pretrained(str(rm_dir))
    cfg.reward_model = str(rm_dir)
    with monkeypatch.context() as m:
        interrupt_after(m, 5)
        with pytest.raises(KeyboardInterrupt):
            almost.stage_selfplay(cfg)
    path = os.path.join(cfg.out, "selfplay_n2.jsonl")
    first = read_records(path)
    assert 0 < len(first) < 11
    almost.stage_selfplay(cfg)
    rs = read_records(path)
    ids = [r["query_id"] for r in rs]
    assert sorted(ids) == list(range(11)) and rs[:len(first)] == first   # 90% of 12 queries, each once
    for r in rs:
        assert r["turns"][0] == {"role": "user", "text": r["query"]}
        for cands in r["candidates"]:
            assert len(cands) == 2
            picked = [c for c in cands if c.get("chosen")]
            good = [c["score"] for c in cands if not c["bad"]]
            assert (len(picked) == 1 and picked[0]["score"] == max(good)) if good else not picked
    assert os.path.isfile(os.path.join(cfg.out, "selfplay_stats.json"))


@pytest.mark.slow
def test_selfplay_says_when_a_turn_has_no_room_and_later_shots_fixes_it(tmp_path, monkeypatch, capsys):
    """A demonstration that fills most of the 512-token context: the first assistant turn fits, the second does
    not. The stage says how many dialogues ended early and why; --later_shots=0 gives the second turn room."""
    from model import load
    from rm import RewardModel
    monkeypatch.setattr(selfplay, "is_bad_response", lambda text: False)    # every candidate usable: turn 2 is reached
    s = os.path.join(ROOT, "data", "stories260K")
    _, tok = load(s)
    demo = "\n\nHuman: Tell me a story.\n\nAssistant: " + "Tom and Lily played in the park with a big red ball. " * 40
    while len(tok.encode("Preamble." + demo, bos=True)) > 440:
        demo = demo[:-60]
    (tmp_path / "long_demo.txt").write_text("Preamble.\n\n-----" + demo.rstrip() + "\n\n-----\n")
    rm_dir = tmp_path / "rm"
    RewardModel.from_pretrained(s).save_pretrained(str(rm_dir))
    results = {}
    for later in (-1, 0):
        out = tmp_path / f"out{later}"
        out.mkdir()
        almost.write_jsonl(str(out / "queries.jsonl"), [{"id": i, "query": f"Can you tell me a story about a cat {i}?"}
                                                 for i in range(6)])
        cfg = Config(profile="paper", out=str(out), n_queries=6, batch_size=4, n=2, selfplay_baseline=False,
                     assistant=f"{s}:{tmp_path / 'long_demo.txt'}:1:24", user=f"{s}::0:24", later_shots=later,
                     reward_model=str(rm_dir), device="cpu")
        almost.stage_selfplay(resolve(cfg))
        results[later] = (read_records(str(out / "selfplay_n2.jsonl")), capsys.readouterr().out)
    records, printed = results[-1]
    ended = [r for r in records if r.get("no_room")]
    assert ended and all(r["no_room"] == "assistant turn 2" and len(r["candidates"]) == 1 for r in ended)
    assert f"{len(ended)} of {len(records)} dialogues ended early" in printed and "--later_shots" in printed
    assert json.load(open(tmp_path / "out-1" / "selfplay_stats.json"))["ended_no_room"] == len(ended)
    records, printed = results[0]
    assert not any(r.get("no_room") for r in records) and "ended early" not in printed
    assert any(len(r["candidates"]) == 2 for r in records)                 # the second turn was sampled
