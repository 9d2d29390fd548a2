"""
Input readers: preference pairs and PPO prompts in every layout the trainers accept (TRL's standard and
implicit-prompt pairs, conversational [{"role", "content"}] messages, Anthropic HH text), from .jsonl, .jsonl.gz
or .json files, turned into the paper's dialogue format. A bad line ends in one message naming file:line.
"""
import gzip
import json
import os
import sys

from common import UserError, decode_text
from tokenizer import messages_text, split_dialogue


def read_lines(path):
    """[(line number, line)] of a .jsonl / .jsonl.gz file, or [(item number, item)] of a .json list. A file that is
    not UTF-8 JSON text (Parquet, binary, a bad byte) ends in one message that names it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:   # a .gz that is not gzip
        raise UserError(f"{path}: cannot be read ({e}).") from None
    lines = [line.removesuffix("\r") for line in decode_text(data, path).split("\n")]
    if path.endswith(".json"):
        try:
            items = json.loads("\n".join(lines))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e}). A .json file must hold a list; use .jsonl for one record "
                            f"a line.") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: a .json data file must hold a list of records.")
        return list(enumerate(items, 1))
    return [(i, line) for i, line in enumerate(lines, 1) if line.strip()]


def pair_of(d):
    """One preference pair in any of TRL's layouts or Anthropic HH's -> {"prompt", "chosen", "rejected"} in the
    paper's dialogue format (plus "rejected_prompt" where the two dialogues differ before their last turn):
    - standard: {"prompt", "chosen", "rejected"} as text, or as [{"role", "content"}] messages (conversational);
    - implicit prompt: {"chosen", "rejected"} whole dialogues: split at the last "\\n\\nAssistant:" (HH), or after
      the longest common prefix (TRL), or before the last message (conversational)."""
    if not isinstance(d, dict) or "chosen" not in d or "rejected" not in d:
        raise ValueError('needs fields "chosen" and "rejected"')
    c, r, p = d["chosen"], d["rejected"], d.get("prompt")
    if any(isinstance(x, list) for x in (c, r, p)):                   # conversational
        if p is None:                                                  # the shared messages before the last
            if not (isinstance(c, list) and isinstance(r, list) and c and r and c[:-1] == r[:-1]):
                raise ValueError('"chosen" and "rejected" must be message lists that differ in the last message only')
            p, c, r = c[:-1], c[-1:], r[-1:]
        last = []
        for name, x in (("chosen", c), ("rejected", r)):
            if not (isinstance(x, list) and len(x) == 1 and isinstance(x[0], dict) and x[0].get("role") == "assistant"
                    and isinstance(x[0].get("content"), str)):
                raise ValueError(f'"{name}" must be one assistant message, [{{"role": "assistant", "content": ...}}]')
            last.append(x[0]["content"])
        return {**d, "prompt": messages_text(p, '"prompt"'), "chosen": last[0], "rejected": last[1]}
    if not isinstance(c, str) or not isinstance(r, str):
        raise ValueError('"chosen" and "rejected" must both be strings or both be message lists')
    if p is not None:
        if not isinstance(p, str):
            raise ValueError('"prompt" must be a string or a message list')
        return d
    cs, rs = split_dialogue(c), split_dialogue(r)
    if cs and rs:                                                      # Anthropic HH
        return {**d, "prompt": cs[0], "chosen": cs[1], "rejected": rs[1], "rejected_prompt": rs[0]}
    k = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
    k -= k > 0 and c[k - 1] == " "                                     # TRL's rule: the space goes with the answer
    if k <= 0:
        raise ValueError('has no "prompt", and "chosen" and "rejected" share no prompt to split off')
    return {**d, "prompt": c[:k], "chosen": c[k:], "rejected": r[k:]}


def read_pairs(path, on_error="stop"):
    """Preference pairs from a .jsonl / .jsonl.gz (one object a line) or .json (a list) file in any layout pair_of
    reads, as dicts {"prompt", "chosen", "rejected"} plus any other fields (e.g. "type"). on_error: "stop" at the first
    bad line with its file:line, or "skip" it with a warning."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file. Give a .jsonl file of {{\"prompt\", \"chosen\", \"rejected\"}} "
                        f"lines.")
    pairs, skipped = [], 0
    for lineno, item in read_lines(path):
        try:
            pairs.append(pair_of(json.loads(item) if isinstance(item, str) else item))
        except (ValueError, json.JSONDecodeError) as e:
            where = f"{path}:{lineno}" + ("" if not path.endswith(".json") else f" (item {lineno})")
            if on_error == "stop":
                raise UserError(f"{where}: bad pair ({e}). Fix the line, or pass --on_error=skip to skip bad "
                                f"lines.") from None
            print(f"warning: {where}: skipped ({e})", file=sys.stderr)
            skipped += 1
    if not pairs:
        raise UserError(f"{path}: no usable pairs" + (f" ({skipped} bad lines skipped)" if skipped else "") +
                        ". The file needs {\"prompt\", \"chosen\", \"rejected\"} lines.")
    return pairs


def read_prompts(path):
    """Prompts from a .txt (one a line) or a .jsonl whose lines hold a "query" or "prompt": a string, or TRL's
    conversational [{"role", "content"}] messages (rendered in the paper's dialogue format)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such prompts file. Give a .jsonl with \"query\" fields or a .txt, one a line.")
    out = []
    for i, line in read_lines(path):
        if not path.endswith((".jsonl", ".jsonl.gz", ".json")):
            out.append(line.rstrip("\n"))
            continue
        try:
            d = json.loads(line) if isinstance(line, str) else line
            p = d.get("query", d.get("prompt")) if isinstance(d, dict) else None
            out.append(messages_text(p, '"prompt"') if isinstance(p, list) else p)
        except (json.JSONDecodeError, ValueError) as e:
            raise UserError(f"{path}:{i}: not a JSON object with a \"query\" or \"prompt\" field ({e}).") from None
        if not isinstance(out[-1], str):
            raise UserError(f"{path}:{i}: no string (or messages) \"query\" or \"prompt\" field.")
    if not out:
        raise UserError(f"{path}: no prompts.")
    return out
