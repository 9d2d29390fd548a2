"""readers.py: preference pairs and PPO prompts in every layout (HH, TRL's, conversations), and bad files in one message."""
import os

import pytest

import readers
from common import UserError
from conftest import ROOT, toy_pairs, write_jsonl
from readers import read_pairs
from tokenizer import format_dialogue


def test_hh_layout_is_split_at_the_last_assistant_turn(tmp_path):
    line = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: Goodbye!",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: No."}
    p = read_pairs(write_jsonl(tmp_path / "hh.jsonl", [line]))[0]
    assert p["prompt"] == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye?"
    assert (p["chosen"], p["rejected"]) == ("Goodbye!", "No.")
    assert format_dialogue(p["prompt"], p["chosen"]) == line["chosen"]


def test_bundled_eval_sets_load():
    hhh = read_pairs(os.path.join(ROOT, "data", "almost", "hhh_eval.json"))
    assert len(hhh) == 221 and {p["type"] for p in hhh} == {"helpful", "harmless", "honest", "other"}
    hh = read_pairs(os.path.join(ROOT, "data", "hh-rlhf", "harmless-base", "test.jsonl.gz"))
    assert len(hh) == 2312


def test_trl_and_conversational_pair_formats(tmp_path):
    """TRL's standard and implicit-prompt layouts, as text and as conversations, all become the paper's dialogue."""
    user = [{"role": "user", "content": "Is the sky blue?"}]
    yes, no = [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}]
    rows = [{"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."},                  # standard
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},                      # implicit prompt
            {"prompt": [{"role": "system", "content": "Be brief."}] + user, "chosen": yes, "rejected": no},
            {"chosen": user + yes, "rejected": user + no},                                        # implicit, conversational
            {"chosen": "\n\nHuman: Is the sky blue?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Is the sky blue?\n\nAssistant: No."}]
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    got = [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    assert got == [("Is the sky blue?", "Yes.", "No."), ("The sky is", " blue.", " green."),
                   ("Be brief.\n\nHuman: Is the sky blue?", "Yes.", "No."), ("\n\nHuman: Is the sky blue?", "Yes.", "No."),
                   ("\n\nHuman: Is the sky blue?", "Yes.", "No.")]
    for bad, words in [({"chosen": user + yes, "rejected": [{"role": "user", "content": "x"}] + no}, "differ in the last"),
                       ({"prompt": user, "chosen": yes + yes, "rejected": no}, "one assistant message"),
                       ({"prompt": [{"role": "robot", "content": "x"}], "chosen": yes, "rejected": no}, '"role"')]:
        with pytest.raises(UserError, match=words):
            read_pairs(write_jsonl(tmp_path / "bad.jsonl", [bad]))


def test_malformed_line_stops_with_file_and_line(tmp_path):
    rows = toy_pairs(3) + ['{"prompt": "x", "chosen": "y"'] + toy_pairs(2, seed=1)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=r"bad\.jsonl:4: bad pair.*--on_error=skip"):
        read_pairs(path)
    assert len(read_pairs(path, on_error="skip")) == 5


def test_missing_fields_and_empty_data(tmp_path):
    with pytest.raises(UserError, match=r"x\.jsonl:1.*\"chosen\" and \"rejected\""):
        read_pairs(write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "chosen": "b"}]))
    with pytest.raises(UserError, match="no usable pairs"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(UserError, match="no such data file"):
        read_pairs(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("content,words", [(b"PAR1\x00\x01binary", "Parquet"),
                                           (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n',
                                            "p.jsonl:2: not UTF-8"),
                                           (b"\x89PNG\r\n\x1a\n\x00\x00", "a binary file")])
def test_binary_and_parquet_files_end_in_one_message(tmp_path, content, words):
    f = tmp_path / "p.jsonl"
    f.write_bytes(content)
    with pytest.raises(UserError, match=words):
        read_pairs(str(f))
    with pytest.raises(UserError, match=words.replace("p.jsonl", "q.jsonl")):
        (tmp_path / "q.jsonl").write_bytes(content)
        readers.read_prompts(str(tmp_path / "q.jsonl"))


def test_ppo_prompts_accept_conversations(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [{"query": "Tell me a story."},
                                           {"prompt": [{"role": "user", "content": "Hi"}]}, {"prompt": "Bye"}])
    assert readers.read_prompts(f) == ["Tell me a story.", "\n\nHuman: Hi", "Bye"]
