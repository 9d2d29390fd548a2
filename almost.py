"""
The ALMoST pipeline: the paper's three steps as stages that talk through files in --out (default out/).

    python almost.py                                   # the bundled story profile, 12-19 minutes on 2 CPU cores
    python almost.py --stages=compare,rm               # rerun some stages; each skips work already on disk
    python almost.py --profile=chat --model=SMOLLM2    # one real chat model in every role, about 40 minutes on CPU
    python almost.py --profile=paper --query_model=LLAMA --generators=NAME=LLAMA:PROMPT_FILE:SHOTS,... \
                     --rubric="A>B>C" ...              # the paper's setting on LLaMA folders you supply

| paper step                               | stage     | function          | writes                                   |
|------------------------------------------|-----------|-------------------|------------------------------------------|
| 1a initial queries (10-shot, ROUGE-L)    | queries   | stage_queries     | queries.jsonl, rl_queries.jsonl          |
| 1b prompted responses (+ BAD rules)      | responses | stage_responses   | responses.jsonl                          |
| 1c synthetic comparisons (filter rule)   | compare   | stage_compare     | comparisons(_nofilter).jsonl, compare_stats.json |
| 1  is the rubric's ranking true here?    | check     | stage_check       | check_stats.json                         |
| 1d Bradley-Terry reward model (rm.py)    | rm        | stage_rm          | rm/, rm_nofilter/, rm_stats.json         |
| 2  RM-guided self-play (best of N)       | selfplay  | stage_selfplay    | selfplay_n{N}.jsonl, selfplay_n1.jsonl, selfplay_stats.json |
| 2  SFT on the dialogues (sft.py)         | sft       | stage_sft         | sft/, sft_plain/, sft_stats.json         |
| 3  RL from synthetic feedback (ppo.py)   | ppo       | stage_ppo         | ppo_prompts.jsonl, ppo/                  |
|    the paper's evaluations (eval.py)     | eval      | stage_eval        | eval/results.json, eval/results.md       |
|    a summary with plots                  | report    | stage_report      | report.md, report_*.png                  |

The rules of step 1 stand beside the stage that uses them: rouge_l (the novelty filter) by stage_queries,
is_bad_response by stage_responses, make_comparisons (the comparison rule) by stage_compare.
queries.jsonl, responses.jsonl and the self-play files are append-only, flushed per record (self-play: per batch
of dialogues): a killed stage loses at most what was in flight, and a rerun skips what is on disk. The trainers
resume from their last/ checkpoints.
"""
import math
import os
import random
import re
import statistics
import string
import time
import zlib
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

import ppo as ppolib
import rm as rmlib
import sft as sftlib
from common import (RecordWriter, UserError, derive_seed, out_lock, parse_args, rank, read_json, read_records,
                    read_text, run_cli, user_set, world_size, write_json, write_jsonl, write_text)
from eval import (MIN_VERDICT_ITEMS, RM_SETS, Config as EvalConfig, decided, difference_interval, evaluate,
                  mean_interval, policy_answers, results_markdown, spread, wilson)
from model import load
from sample import generate, shared_prefix_length
from tokenizer import TURN_ENDS, dialogue_text, format_dialogue, postprocess_response, trim_to_sentence
import memory
from trainer import ScaleConfig, barrier, end_distributed, memory_dry_run, setup_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
# profiles: the paper's generators on LLaMA folders you supply, or the bundled story models

DATA = os.path.join(HERE, "data")
PROFILES = {
    # the paper: dialogue prompts (HHH / Faithful), "Query:" lines for query generation; models are the user's
    "paper": dict(format="dialogue", seeds=os.path.join(DATA, "almost", "seed_prompts.txt"), n_queries=10000,
                  n_rl_queries=10000, queries_per_prompt=1,
                  query_model="", generators="", rubric="", rm_model="", rm_preset="", assistant="", user="",
                  sft={}, ppo=dict(steps=1000, lr=1e-6, value_lr=1e-6, batch_size=64, minibatch=8,
                                   max_new_tokens=256)),
    # the bundled story domain (README, "The story profile"): queries are story openings, responses continue
    # them, demonstrations are short stories; the generators differ in model size, shots and demo quality
    "stories": dict(format="story", seeds=os.path.join(DATA, "stories", "seed_openings.txt"), n_queries=300,
                    n_rl_queries=200, queries_per_prompt=32,
                    query_model=os.path.join(DATA, "stories260K"),
                    generators=",".join([
                        f"260K-good-2shot={DATA}/stories260K:{DATA}/stories/good_stories.txt:2:160",
                        f"260K-plain-1shot={DATA}/stories260K:{DATA}/stories/plain_stories.txt:1:160",
                        f"50K-plain-1shot={DATA}/stories50K:{DATA}/stories/plain_stories.txt:1:160",
                        f"50K-0shot={DATA}/stories50K::0:160"]),
                    rubric="260K-good-2shot>260K-plain-1shot>50K-plain-1shot>50K-0shot",
                    rm_model=os.path.join(DATA, "stories260K"), rm_preset="tiny",
                    # the reward models on 500 evenly spaced pairs of each HH test split (of about 2,300): a 95%
                    # interval of +-4.4 points, enough to tell a story model's accuracy from chance; the policies on
                    # 200 of TruthfulQA's 790 questions (nine tenths of the eval stage's time; a story model's MC1 is
                    # no claim) and of static HHH's 221. --eval_rm_items=0 --eval_max_items=0: every item
                    run=dict(eval_rm_items=500, eval_max_items=200),
                    # step 2: stories260K with one good demonstration continues the story; stories260K plays the
                    # user by adding the next sentence; SFT settings for a 260K model on CPU
                    assistant=f"{DATA}/stories260K:{DATA}/stories/good_stories.txt:1:120",
                    user=f"{DATA}/stories260K::0:40",
                    sft=dict(sft_lr=5e-4, sft_batch=16, sft_micro_batch=16, sft_epochs=3.0, sft_eval_every=10),
                    # PPO: the SFT policy almost never ends a story within the budget, so a missing-EOS penalty
                    # would give every response the same score; truncated responses keep their RM score instead,
                    # scored back to their last full sentence, as the reward model's training answers were cut
                    # (trim_cut; measured over seeds in docs/reference.md, "PPO on the story profile"). A KL
                    # coefficient that adapts within the run (target 4 nats) keeps the policy near the SFT policy
                    ppo=dict(steps=40, lr=5e-5, value_lr=3e-4, batch_size=16, minibatch=8, max_new_tokens=64,
                             beta=0.15, kl_target=4.0, kl_horizon=640, penalize_missing_eos=False, trim_cut=True)),
    # the paper's method on one real chat model (--model, e.g. SmolLM2-135M-Instruct) sized for 2 CPU cores: the
    # paper's prompt files and seed queries; generators differ in prompt quality (the long, well-formatted Faithful
    # dialogues vs the HHH ones) and shots. One model offers no size axis. {model} stands for --model.
    "chat": dict(format="dialogue", seeds=os.path.join(DATA, "almost", "seed_prompts.txt"), n_queries=60,
                 n_rl_queries=50, queries_per_prompt=1,
                 query_model="{model}",
                 generators=",".join([f"faithful-3shot={{model}}:{DATA}/almost/Faithful_prompt.txt:3:128",
                                      f"hhh-3shot={{model}}:{DATA}/almost/HHH_prompt.txt:3:128",
                                      f"hhh-0shot={{model}}:{DATA}/almost/HHH_prompt.txt:0:128"]),
                 rubric="faithful-3shot>hhh-3shot>hhh-0shot", rm_model="{model}", rm_preset="chat",
                 assistant=f"{{model}}:{DATA}/almost/Faithful_prompt.txt:3:128",
                 user=f"{{model}}:{DATA}/almost/HHH_prompt.txt:1:40",
                 run=dict(turns=1, trim_cut=True, eval_max_items=100, eval_rm_items=221, eval_vicuna=False),
                 sft=dict(sft_lr=2e-5, sft_batch=8, sft_micro_batch=4, sft_epochs=2.0, sft_eval_every=5,
                          sft_max_length=384),
                 # PPO: 64-token responses rarely reach EOS, so a truncated one keeps its RM score (as stories)
                 ppo=dict(steps=12, lr=2e-6, value_lr=2e-5, batch_size=8, minibatch=4, ppo_epochs=2,
                          max_new_tokens=64, beta=0.1, kl_target=4.0, kl_horizon=96, penalize_missing_eos=False)),
}


@dataclass
class Config(ScaleConfig):   # device, dtype, LoRA, gradient checkpointing, FSDP (trainer.py), for every trainer stage
    profile: str = "stories"        # "stories" (bundled), "chat" (one chat model: --model) or "paper"
    model: str = ""                 # the chat profile's model folder: it plays every role (SmolLM2-135M-Instruct, say)
    out: str = "out"                # the folder every stage reads and writes
    stages: str = "queries,responses,compare,check,rm,selfplay,sft,ppo,eval,report"  # stages to run, in this order
    n_queries: int = 0              # 0 = the profile's (stories 300, paper 10000): self-play's, 10% held out
    n_rl_queries: int = 0           # 0 = the profile's (stories 200, chat 50, paper 10000): PPO's prompts, a set of
                                    # their own made by the same rules (1a), none a self-play query
    queries_per_prompt: int = 0     # 1a: samples drawn from one 10-shot prompt (0 = the profile's: 1, a new draw of
                                    # shots for every sample, as the authors; stories 32, one prompt per sampler call,
                                    # its prefix computed once: 3x faster there at the same acceptance rate)
    trim_cut: bool = False          # 1b, 2: a dialogue turn cut by the token budget goes back to its last full sentence
                                    # (the chat profile's short budgets; the paper's budgets rarely cut)
    query_line: str = "authors"     # 1a, dialogue format: "authors" (first line starting "Query:") or "first" line
    seeds: str = ""                 # seed pool file ("" = the profile's); its first line is an instruction line
    query_model: str = ""           # "" = the profile's
    generators: str = ""            # NAME=MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS],...  ("" = the profile's)
    rubric: str = ""                # config names best first, ">" between ranks, "=" inside one: "A>B=C>D"
    rm_model: str = ""              # base LLaMA for the reward model ("" = the profile's)
    rm_preset: str = ""             # rm.py preset ("" = the profile's: tiny for stories, the paper's defaults otherwise)
    rm_filter_ablation: bool = True  # also train a reward model without the length rule
    judge: str = ""                 # check: the LLM that judges the rubric's pairs (dialogue format; "" = the rm_model)
    check_items: int = 100          # check: queries judged per rubric pair at most (0 = all)
    rm_checkpoint: str = "last"     # step 1's reward model for what follows: "last" (the authors') or "best" held-out
    # step 2
    turns: int = 2                  # self-play: assistant turns per dialogue
    n: int = 4                      # self-play: candidates per assistant turn (best of n by the reward model)
    later_shots: int = -1           # self-play: shots in the assistant's prompt after its first turn (-1: the same)
    selfplay_baseline: bool = True  # also the plain self-play baseline (n = 1)
    assistant: str = ""             # MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS] ("" = the profile's)
    user: str = ""                  # MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS] that plays the human ("" = the profile's)
    reward_model: str = ""          # "" = step 1's: {out}/rm/{rm_checkpoint}
    sft_model: str = ""             # the policy SFT starts from ("" = the assistant's model)
    sft_lr: float = 2e-5            # SFT defaults: the paper's (the story profile overrides them)
    sft_batch: int = 64             # sequences per optimizer step
    sft_micro_batch: int = 8        # sequences per forward/backward
    sft_epochs: float = 3.0         # passes over the dialogues
    sft_max_length: int = 512       # tokens per dialogue; longer ones are left out
    sft_eval_every: int = 50        # optimizer steps between held-out evaluations
    # step 3 (ppo.py's settings; the story profile sets its own)
    ppo_steps: int = 0              # 0 = the profile's (stories 40, paper 1000)
    ppo_lr: float = 0.0             # 0 = the profile's
    eval_max_items: int = 0         # cap every evaluation set at this many items (0 = all; the story profile: 200)
    eval_rm_items: int = -1         # the reward models' pairs from static HHH and each HH test split, evenly spaced
                                    # (-1: as --eval_max_items, 0: all; the story profile's: 500, the chat's: 221;
                                    # --eval_max_items given alone caps them too)
    eval_vicuna: bool = True        # Vicuna-80 answers of every policy, judged by the reward model
    eval_max_new_tokens: int = 0    # Vicuna-80 answers' length at most (0 = the profile's: stories 120, else 1024)
    dry_run: bool = False           # print the plan (stages, models, counts, tokens to generate) and stop
    batch_size: int = 32            # prompts per sampler call
    seed: int = 1337                # every random stream of the run derives from it


def scale_flags(cfg):
    """The device / precision / LoRA / checkpointing / FSDP flags, handed to each trainer."""
    return {f.name: getattr(cfg, f.name) for f in fields(ScaleConfig)}


def resolve(cfg):
    """Fill the profile's defaults into the fields left empty."""
    if cfg.profile not in PROFILES:
        raise UserError(f"--profile={cfg.profile!r}: use one of {', '.join(PROFILES)}.")
    prof = PROFILES[cfg.profile]
    if cfg.profile == "chat":
        if not cfg.model:
            raise UserError("--profile=chat needs --model: a chat model folder (a LLaMA-family HF folder, "
                            "SmolLM2-135M-Instruct say); it plays every role.")
        if not os.path.isfile(os.path.join(cfg.model, "config.json")):
            raise UserError(f"--model={cfg.model}: no config.json there. Point it at a model folder.")
        if ":" in cfg.model or "," in cfg.model:
            raise UserError(f"--model={cfg.model}: a path with ':' or ',' cannot stand in a generator spec; "
                            f"move or link the folder.")
    for k in ("seeds", "query_model", "generators", "rubric", "rm_model", "rm_preset", "n_queries", "n_rl_queries",
              "queries_per_prompt", "assistant", "user"):
        if not getattr(cfg, k):
            v = prof[k]
            setattr(cfg, k, v.replace("{model}", cfg.model) if isinstance(v, str) else v)
    for k, v in {**prof.get("run", {}), **prof["sft"]}.items():
        if not user_set(cfg, k):   # flags given on the command line win, whatever their value
            setattr(cfg, k, v)
    if cfg.queries_per_prompt < 1:
        raise UserError(f"--queries_per_prompt={cfg.queries_per_prompt}: use 1 (a draw of shots for every sample) "
                        f"or more.")
    if user_set(cfg, "eval_max_items") and not user_set(cfg, "eval_rm_items"):
        cfg.eval_rm_items = -1     # a cap given for the evaluation sets holds for the reward models' sets too
    if cfg.rm_checkpoint not in ("last", "best"):
        raise UserError(f"--rm_checkpoint={cfg.rm_checkpoint!r}: use last or best.")
    cfg.reward_model = cfg.reward_model or os.path.join(cfg.out, "rm", cfg.rm_checkpoint)
    cfg.format = prof["format"]
    if cfg.query_line not in QUERY_STOPS:
        raise UserError(f"--query_line={cfg.query_line!r}: use one of {', '.join(QUERY_STOPS)}.")
    return cfg


@dataclass
class Generator:
    name: str
    model: str
    prompt_file: str
    shots: int
    max_new_tokens: int


def parse_generator(name, spec, fmt):
    """MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS] -> Generator (PROMPT_FILE may be empty with 0 shots)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[2].isdigit() or (len(parts) == 4 and not parts[3].isdigit()):
        raise UserError(f"{name}: {spec!r} is not MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS].")
    model, pfile, shots = parts[0], parts[1], int(parts[2])
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


def turn_prompt(tok, fmt, preamble, demos, shots, turns, role="assistant"):
    """The prompt that makes a model write the next turn (step 1's response is the assistant's first turn): the
    dialogue prompt above (BOS first), or in the story format the demonstration stories after BOS, then the story
    so far. (A tokenizer that normalizes whitespace, like the bundled one, drops the trailing space.)"""
    if fmt == "dialogue":
        return tok.encode(dialogue_prompt_text(preamble, demos, shots, turns, role), bos=True)
    return [i for d in demos[:shots] for i in tok.encode(d.strip(), bos=True)] + tok.encode(story_so_far(turns))


def story_response(text, ended):
    return text.strip() if ended else trim_to_sentence(text.strip()).strip()



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


def stage_queries(cfg):
    """1a: the self-play queries (queries.jsonl; the last 10% held out), then the RL prompts (rl_queries.jsonl): a
    second set made the same way, novel against every query of the first (the paper's figure 1), so PPO optimises on
    prompts that the SFT demonstrations never answered."""
    make_queries(cfg, "queries.jsonl", cfg.n_queries, others="rl_queries.jsonl")
    make_queries(cfg, "rl_queries.jsonl", cfg.n_rl_queries, others="queries.jsonl")


def make_queries(cfg, name, n, others):
    """Sample queries into {out}/name until it holds n: 10 examples drawn from the seeds and this set's queries (a
    draw for every queries_per_prompt samples), a query kept if it passes the length rule and is novel (ROUGE-L < 0.5)
    against the seeds, this set and `others`."""
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
    with RecordWriter(path) as w, tqdm(total=n, initial=len(done), desc=name.removesuffix(".jsonl")) as bar:
        while len(done) + n_new < n:
            if tries > 50 * n:
                hint = (" Most samples had no line starting with \"Query:\" (the authors' rule takes the second query "
                        "a model writes): --query_line=first takes the first." if cfg.format == "dialogue" and
                        cfg.query_line == "authors" and rejected["empty"] > tries // 2 else "")
                flag = "--n_queries" if name == "queries.jsonl" else "--n_rl_queries"
                raise UserError(f"queries: only {len(done) + n_new} of {n} accepted into {path} after {tries} "
                                f"samples ({rejected}). Lower {flag} or add seeds to {cfg.seeds}.{hint}")
            prompts = []   # each 10-shot prompt serves queries_per_prompt rows (a shared prefix: computed once)
            while len(prompts) < cfg.batch_size:
                prompts += [query_prompt(tok, cfg.format, instruction, rng.sample(pool, min(10, len(pool))))] * \
                    cfg.queries_per_prompt
            prompts = prompts[:cfg.batch_size]
            budget = min(64, model.config.max_position_embeddings - max(map(len, prompts)))
            if budget < 16:
                raise UserError(f"queries: a 10-shot query prompt of {max(map(len, prompts))} tokens leaves no room "
                                f"in the context window ({model.config.max_position_embeddings}) of "
                                f"{cfg.query_model}: use shorter seeds or a model with a longer context.")
            stop = QUERY_STOPS[cfg.query_line] if cfg.format == "dialogue" else STORY_QUERY_STOP
            outs, _ = generate(model, prompts, budget, temperature=1.2, top_p=0.9, seed=rng.randrange(2**31),
                               stop_strings=[stop], tokenizer=tok)
            for o in outs:
                tries += 1
                q = extract_query(tok.decode(o), cfg.format, cfg.query_line)
                qt = rouge_tokens(q)
                reason = ("empty" if not qt else "length" if bad_query_length(q)
                          else "overlap" if not novelty.is_novel(qt) else None)
                if reason:
                    rejected[reason] += 1
                    continue
                pool.append(q)
                novelty.add(qt)
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


def stage_responses(cfg):
    queries = read_records(os.path.join(cfg.out, "queries.jsonl"))[:cfg.n_queries]
    if not queries:
        raise UserError(f"{cfg.out}/queries.jsonl is empty or missing: run the queries stage first "
                        f"(--stages=queries,responses).")
    gens = parse_generators(cfg.generators, cfg.format)
    path = os.path.join(cfg.out, "responses.jsonl")
    done = {(r["query_id"], r["config"]) for r in read_records(path)}
    models = {}
    with RecordWriter(path) as w:
        for g in gens:
            todo = [q for q in queries if (q["id"], g.name) not in done]
            if not todo:
                print(f"responses: {g.name}: all {len(queries)} on disk, skipping")
                continue
            if g.model not in models:
                models = {g.model: load(g.model, device=cfg.device)}   # one model in memory at a time
            model, tok = models[g.model]
            preamble, demos = read_demos(g.prompt_file)
            if g.shots > len(demos):
                raise UserError(f"{g.prompt_file}: {g.name} asks for {g.shots} shots, the file has {len(demos)}.")
            prompts = {q["id"]: turn_prompt(tok, cfg.format, preamble, demos, g.shots, [("user", q["query"])])
                       for q in todo}
            ctx = model.config.max_position_embeddings
            longest = max(map(len, prompts.values()))
            if longest >= ctx:
                raise UserError(f"{g.name}: a prompt of {longest} tokens does not fit the context window ({ctx}) "
                                f"of {g.model}: use fewer shots.")
            if longest + g.max_new_tokens > ctx:   # as vLLM does: the budget stops at the context window
                print(f"note: {g.name}: the longest prompt ({longest} tokens) leaves {ctx - longest} of the "
                      f"{g.max_new_tokens} new tokens inside the context window ({ctx}); longer answers are cut")
            todo.sort(key=lambda q: len(prompts[q["id"]]))           # similar lengths batch together
            for b in tqdm(range(0, len(todo), cfg.batch_size), desc=f"responses {g.name}"):
                batch = todo[b:b + cfg.batch_size]
                seed = derive_seed(cfg.seed, "sampling", zlib.crc32(g.name.encode()) + batch[0]["id"], bits=31)
                resps = sample_turns(model, tok, [prompts[q["id"]] for q in batch], g, cfg.format, "assistant", seed,
                                     cfg.trim_cut)
                for q, resp in zip(batch, resps):
                    resp = resp or ""
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
    from collections import Counter
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
    for w in small_data_warnings(cfg, ["pairs"]):
        print(w)



# -----------------------------------------------------------------------------
# check: is the ranking assumption true here? An independent look at each generator's answers
@torch.no_grad()
def stage_check(cfg):
    """Per config, over its non-BAD responses: the judge model's mean NLL per token of the response given the
    query alone (no demonstrations), the rate of repeated word 3-grams, and the mean length. The judge is the
    rm_model (stories: the larger stories260K), which sampled some of these answers itself: lower NLL favours its
    own outputs, so read the size axis with that in mind."""
    model, tok = load(cfg.rm_model, device=cfg.device)
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
            full = full[-model.config.max_position_embeddings:]
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
        judge = cfg.judge or cfg.rm_model
        result["axes"] = judge_rubric(cfg, rs, judge, *((model, tok) if judge == cfg.rm_model else
                                                         load(judge, device=cfg.device)))
    write_json(os.path.join(cfg.out, "check_stats.json"), result)
    print("check (judge " + os.path.basename(cfg.rm_model.rstrip("/")) + "): " + "; ".join(
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
    both answered (not BAD), the judge model (--judge, default the rm_model) reads the query and the two answers in the
    authors' static-HHH judge prompt, in both orders, and prefers A when P(A) summed over the orders is at least
    P(B)'s (eval.eval_hhh_judge). A win rate whose 95% interval lies above 50% supports the rubric's claim; one
    below refutes it. The judge must not be the generators' model to be independent: when it is, say so."""
    from eval import eval_hhh_judge
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
    ps = rmlib.read_pairs(path)
    cap = n or (cfg.eval_max_items if cfg.eval_rm_items < 0 else cfg.eval_rm_items)
    return ps if name.startswith("held_out") else spread(ps, cap)


def stage_rm(cfg):
    pairs = {"filter": read_records(os.path.join(cfg.out, "comparisons.jsonl")),
             "nofilter": read_records(os.path.join(cfg.out, "comparisons_nofilter.jsonl"))}
    if not pairs["filter"]:
        raise UserError(f"{cfg.out}/comparisons.jsonl is empty or missing: run the compare stage first.")
    # one held-out split by query, shared by both reward models, so their accuracies compare; drawn from the queries
    # that have pairs under the length rule, so the held-out set is never empty
    queries = sorted({p["prompt"] for p in pairs["filter"]})
    random.Random(cfg.seed).shuffle(queries)
    held = set(queries[:max(1, len(queries) // 10)])
    data_dir = os.path.join(cfg.out, "rm_data")
    if rank() == 0:
        os.makedirs(data_dir, exist_ok=True)
        for k, ps in pairs.items():
            write_jsonl(os.path.join(data_dir, f"train_{k}.jsonl"), [p for p in ps if p["prompt"] not in held])
            write_jsonl(os.path.join(data_dir, f"val_{k}.jsonl"), [p for p in ps if p["prompt"] in held])
    barrier()
    if rank() == 0:
        for w in small_data_warnings(cfg, ["pairs", "rm_steps", "held_out_pairs"]):   # before the training is spent
            print(w)
    variants = ["filter", "nofilter"] if cfg.rm_filter_ablation else ["filter"]
    stats = {}
    for k in variants:
        out = os.path.join(cfg.out, "rm" if k == "filter" else "rm_nofilter")
        tc = rmlib.TrainConfig(data=os.path.join(data_dir, f"train_{k}.jsonl"),
                               val_data=os.path.join(data_dir, "val_filter.jsonl"), model=cfg.rm_model, out=out,
                               preset=cfg.rm_preset, seed=cfg.seed, **scale_flags(cfg))
        rmlib.train(tc)
        barrier()   # under torchrun: the other processes wait here for process 0's checkpoint
        if rank() != 0:
            continue
        model = rmlib.RewardModel.from_pretrained(os.path.join(out, cfg.rm_checkpoint), device=cfg.device)
        s = {}
        for name, path in [("held_out", os.path.join(data_dir, "val_filter.jsonl")),
                           ("held_out_nofilter", os.path.join(data_dir, "val_nofilter.jsonl")), *RM_SETS.items()]:
            ps = rm_eval_pairs(cfg, name, path)
            s[name] = rmlib.evaluate_pairs(model, rmlib.tokenize_pairs(model, ps, path))
        stats[k] = s
        print(f"rm ({'with' if k == 'filter' else 'without'} the length rule): held-out accuracy "
              f"{s['held_out']['accuracy']:.3f}, corr(score, length) {s['held_out']['length_corr']:.3f}, "
              f"static HHH {s['static_hhh']['accuracy']:.3f}, HH harmless {s['hh_harmless']['accuracy']:.3f}, "
              f"HH helpful {s['hh_helpful']['accuracy']:.3f}")
    if rank() == 0:
        write_json(os.path.join(cfg.out, "rm_stats.json"), stats)



# -----------------------------------------------------------------------------
# Step 2. RM-guided self-play (RMSP): best-of-N assistant turns by the reward model, then SFT (sft.py)

def best_of(scores, bad):
    """Index of the highest score among the candidates that are not BAD (None if all are BAD)."""
    ok = [i for i in range(len(scores)) if not bad[i]]
    return max(ok, key=lambda i: scores[i]) if ok else None


def split_queries(cfg):
    """Step 1's queries: self-play uses the first 90%; the last 10% are held out to compare the SFT policies."""
    qs = read_records(os.path.join(cfg.out, "queries.jsonl"))[:cfg.n_queries]
    if len(qs) < 2:
        raise UserError(f"{cfg.out}/queries.jsonl has {len(qs)} queries: run the queries stage first.")
    k = max(1, len(qs) // 10)
    return qs[:-k], qs[-k:]


def sample_turns(model, tok, prompts, g, fmt, role, seed, trim_cut=False):
    """Sample one turn per prompt with THE sampler; returns texts, None where the prompt leaves fewer than 8 tokens of
    the context window (no room for the turn). trim_cut: a dialogue turn that the token budget cut short goes back to
    its last full sentence (--trim_cut)."""
    ctx = model.config.max_position_embeddings
    fit = [i for i, p in enumerate(prompts) if len(p) + 8 <= ctx]
    texts = [None] * len(prompts)
    if not fit:
        return texts
    budget = min(g.max_new_tokens, ctx - max(len(prompts[i]) for i in fit))
    stops = TURN_ENDS if fmt == "dialogue" else None          # a story ends at its EOS
    outs, _ = generate(model, [prompts[i] for i in fit], budget, temperature=1.0, top_p=0.9, seed=seed,
                       stop_strings=stops, tokenizer=tok)
    for i, o in zip(fit, outs):
        t = tok.decode(o)
        if fmt == "dialogue":
            cut = len(o) >= budget and not any(s in t for s in TURN_ENDS)     # the budget ended the turn
            t = postprocess_response(t)
            if cut and trim_cut:
                t = trim_to_sentence(t)
        elif role == "assistant":
            t = story_response(t, ended=len(o) < budget)
        else:   # the story's user adds one sentence
            t = extract_query(t, "story")
        texts[i] = t
    return texts


def selfplay(cfg, n, path, assistant, user, reward_model):
    queries, _ = split_queries(cfg)
    done = {r["query_id"] for r in read_records(path)}
    todo = [q for q in queries if q["id"] not in done]
    if not todo:
        print(f"selfplay n={n}: all {len(queries)} dialogues in {path}, skipping")
        return
    a_model, a_tok = load(assistant.model, device=cfg.device)
    u_model, u_tok = (a_model, a_tok) if user.model == assistant.model else load(user.model, device=cfg.device)
    a_demos, u_demos = read_demos(assistant.prompt_file), read_demos(user.prompt_file)
    per_call = max(1, cfg.batch_size // n)   # dialogues per chunk: their n candidates share one sampler call
    with RecordWriter(path) as w:
        for b in tqdm(range(0, len(todo), per_call), desc=f"selfplay n={n}"):
            chunk = todo[b:b + per_call]
            dls = [{"query_id": q["id"], "query": q["query"], "turns": [("user", q["query"])], "candidates": [],
                    "ended": False, "no_room": None} for q in chunk]
            for t in range(cfg.turns):
                live = [d for d in dls if not d["ended"]]
                if not live:
                    break
                seed = derive_seed(cfg.seed, "sampling", zlib.crc32(f"{n}".encode()) + chunk[0]["id"] * 31 + t, bits=31)
                shots = assistant.shots if t == 0 or cfg.later_shots < 0 else cfg.later_shots
                prompts = [turn_prompt(a_tok, cfg.format, *a_demos, shots, d["turns"], "assistant")
                           for d in live for _ in range(n)]
                cands = sample_turns(a_model, a_tok, prompts, assistant, cfg.format, "assistant", seed, cfg.trim_cut)
                for i, d in enumerate(live):
                    if cands[i * n] is None:   # the prompt leaves no room: the dialogue ends, and the stage says so
                        d["ended"], d["no_room"] = True, f"assistant turn {t + 1}"
                live = [d for d in live if not d["ended"]]
                cands = [c for c in cands if c is not None]
                scores = reward_model.score([dialogue_text(d["turns"]) for d in live for _ in range(n)],
                                            cands).tolist()
                for i, d in enumerate(live):
                    cs, sc = cands[i * n:(i + 1) * n], scores[i * n:(i + 1) * n]
                    bad = [is_bad_response(c) for c in cs]
                    pick = best_of(sc, bad)
                    d["candidates"].append([{"text": c, "score": x, "bad": y} for c, x, y in zip(cs, sc, bad)])
                    if pick is None:       # every candidate BAD: the dialogue ends before this turn
                        d["ended"] = True
                        continue
                    d["candidates"][-1][pick]["chosen"] = True
                    d["turns"].append(("assistant", cs[pick]))
                if t == cfg.turns - 1:
                    break
                live = [d for d in dls if not d["ended"]]
                if not live:
                    break
                uprompts = [turn_prompt(u_tok, cfg.format, *u_demos, user.shots, d["turns"], "user") for d in live]
                utexts = sample_turns(u_model, u_tok, uprompts, user, cfg.format, "user", seed + 1, cfg.trim_cut)
                for d, u in zip(live, utexts):
                    if u is None:
                        d["ended"], d["no_room"] = True, f"user turn {t + 2}"
                    elif len(u) < 10:      # no usable user turn: the dialogue ends here
                        d["ended"] = True
                    else:
                        d["turns"].append(("user", u))
            for d in dls:
                if d["turns"][-1][0] == "user" and len(d["turns"]) > 1:
                    d["turns"].pop()       # a dialogue ends with the assistant
                w.write({"query_id": d["query_id"], "query": d["query"], "n": n,
                         "turns": [{"role": r, "text": x} for r, x in d["turns"]],
                         "usable": len(d["turns"]) > 1, "candidates": d["candidates"],
                         **({"no_room": d["no_room"]} if d["no_room"] else {})})
    records = read_records(path)
    short = Counter(r["no_room"] for r in records if r.get("no_room"))
    if short:
        ctx = a_model.config.max_position_embeddings
        print(f"warning: selfplay n={n}: {sum(short.values())} of {len(records)} dialogues ended early because the "
              f"prompt left no room in the context window ({ctx} tokens) for " +
              ", ".join(f"{k} ({v})" for k, v in sorted(short.items())) +
              f". The prompt holds the preamble, {assistant.shots} demonstration(s) and the dialogue so far: use "
              f"fewer demonstrations after the first turn (--later_shots=K), fewer --turns, or a model with a longer "
              f"context.")


def stage_selfplay(cfg):
    assistant = parse_generator("--assistant", cfg.assistant, cfg.format)
    user = parse_generator("--user", cfg.user, cfg.format)
    reward_model = rmlib.RewardModel.from_pretrained(rmlib.RewardModel.check(cfg.reward_model, "--reward_model"),
                                                     device=cfg.device)
    for n in [cfg.n] + ([1] if cfg.selfplay_baseline and cfg.n != 1 else []):
        selfplay(cfg, n, os.path.join(cfg.out, f"selfplay_n{n}.jsonl"), assistant, user, reward_model)
    stats = selfplay_stats(read_records(os.path.join(cfg.out, f"selfplay_n{cfg.n}.jsonl")))
    write_json(os.path.join(cfg.out, "selfplay_stats.json"), stats)
    for w in small_data_warnings(cfg, ["dialogues"]):
        print(w)
    print(f"selfplay: {stats['dialogues']} dialogues ({stats['usable']} usable, {stats['assistant_turns']} "
          f"assistant turns); mean RM score of the chosen candidate {stats['chosen_score']:.3f} vs a random one "
          f"{stats['random_score']:.3f}; expected best of k: " +
          ", ".join(f"k={k} {v:.3f}" for k, v in stats["best_of_k"].items()))


def selfplay_stats(records):
    """The best-of-N gain: mean RM score of the chosen candidate vs a random (non-BAD) one, and the expected
    best score among k candidates drawn without replacement from each turn's non-BAD ones, for k = 1..N."""
    from itertools import combinations
    turns = [[c["score"] for c in cs if not c["bad"]] for r in records for cs in r["candidates"]]
    turns = [t for t in turns if t]
    chosen = [max(t) for t in turns]
    best_of_k = {}
    for k in range(1, max((len(t) for t in turns), default=0) + 1):
        vals = [statistics.fmean(max(c) for c in combinations(t, k)) for t in turns if len(t) >= k]
        best_of_k[k] = statistics.fmean(vals) if vals else float("nan")
    return {"dialogues": len(records), "usable": sum(r["usable"] for r in records), "assistant_turns": len(turns),
            "chosen_score": statistics.fmean(chosen) if chosen else float("nan"),
            "random_score": statistics.fmean(statistics.fmean(t) for t in turns) if turns else float("nan"),
            "best_of_k": best_of_k, "ended_no_room": sum(bool(r.get("no_room")) for r in records)}


def sft_config(cfg, data, out, base):
    """sft.py's Config for the sft stage: the --sft_* flags and the scale flags."""
    return sftlib.Config(data=data, model=base, out=out, lr=cfg.sft_lr, batch_size=cfg.sft_batch,
                         micro_batch=cfg.sft_micro_batch, epochs=cfg.sft_epochs, max_length=cfg.sft_max_length,
                         eval_every=cfg.sft_eval_every, seed=cfg.seed, **scale_flags(cfg))


@torch.no_grad()
def stage_sft(cfg):
    """SFT on the RMSP dialogues (-> sft/) and on the plain self-play ones (-> sft_plain/); then each policy
    answers the held-out queries (temperature 0.7, as the paper's Vicuna protocol) and the reward model scores
    the answers."""
    assistant = parse_generator("--assistant", cfg.assistant, cfg.format)
    base = cfg.sft_model or assistant.model
    runs = {"sft": f"selfplay_n{cfg.n}.jsonl"}
    if cfg.selfplay_baseline and cfg.n != 1:
        runs["sft_plain"] = "selfplay_n1.jsonl"
    stats = {}
    for name, data in runs.items():
        with torch.enable_grad():
            st, _ = sftlib.train(sft_config(cfg, os.path.join(cfg.out, data), os.path.join(cfg.out, name), base))
        stats[name] = {"best_held_out_loss": st["best_loss"], "steps": st["step"]}
    barrier()
    if rank() != 0:   # under torchrun the comparison below runs in process 0 alone
        return
    reward_model = rmlib.RewardModel.from_pretrained(rmlib.RewardModel.check(cfg.reward_model, "--reward_model"),
                                                     device=cfg.device)
    _, held = split_queries(cfg)
    for name in ["base"] + list(runs):
        model, tok = load(base if name == "base" else os.path.join(cfg.out, name, "best"), device=cfg.device)
        answers = policy_answers(model, tok, [q["query"] for q in held], assistant.max_new_tokens, cfg.seed)
        scores = reward_model.score([q["query"] for q in held], answers)
        stats.setdefault(name, {}).update({"held_out_queries": len(held), "mean_rm_score": scores.mean().item(),
                                           "scores": scores.tolist(),
                                           "bad_rate": statistics.fmean(is_bad_response(a) for a in answers),
                                           "example": answers[0]})
    write_json(os.path.join(cfg.out, "sft_stats.json"), stats)
    print("sft: mean RM score on held-out queries: " + ", ".join(f"{k} {v['mean_rm_score']:.3f}" for k, v in stats.items()))



# -----------------------------------------------------------------------------
# Step 3. RL from synthetic feedback: PPO (ppo.py) on the SFT policy against the reward model

def ppo_config(cfg, policy, prompts):
    """ppo.py's Config for the ppo stage: the profile's settings, --ppo_steps / --ppo_lr, the scale flags."""
    settings = dict(PROFILES[cfg.profile]["ppo"])
    if cfg.ppo_steps:
        settings["steps"] = cfg.ppo_steps
    if cfg.ppo_lr:
        settings["lr"] = cfg.ppo_lr
    return ppolib.Config(policy=policy, rm=cfg.reward_model, prompts=prompts, out=os.path.join(cfg.out, "ppo"),
                         seed=cfg.seed, **scale_flags(cfg), **settings)


def stage_ppo(cfg):
    """PPO from step 2's SFT policy (out/sft/best) against step 1's reward model, on the RL prompts of step 1a
    (rl_queries.jsonl, none of them a self-play query; the held-out queries stay unseen). A run whose queries stage
    predates the RL prompts makes them here. ppo.py resumes from out/ppo/last."""
    rl = os.path.join(cfg.out, "rl_queries.jsonl")
    if len(read_records(rl)) < cfg.n_rl_queries:
        if world_size() > 1:
            raise UserError(f"{rl} holds {len(read_records(rl))} of --n_rl_queries={cfg.n_rl_queries} RL prompts: make "
                            f"them first in one process (python almost.py --stages=queries --out={cfg.out}).")
        print(f"ppo: {rl} holds {len(read_records(rl))} of {cfg.n_rl_queries} RL prompts (the queries stage makes "
              f"them since the RL prompts became their own set): making them now")
        make_queries(cfg, "rl_queries.jsonl", cfg.n_rl_queries, others="queries.jsonl")
    prompts = os.path.join(cfg.out, "ppo_prompts.jsonl")
    if rank() == 0:
        write_jsonl(prompts, [{"query": q["query"]} for q in read_records(rl)[:cfg.n_rl_queries]])
        for w in small_data_warnings(cfg, ["rl_prompts"]):
            print(w)
    barrier()
    policy = os.path.join(cfg.out, "sft", "best")
    if not os.path.isfile(os.path.join(policy, "config.json")):
        raise UserError(f"{policy}: no SFT policy; run the sft stage first (--stages=sft,ppo).")
    state = ppolib.train(ppo_config(cfg, policy, prompts))
    rows = read_records(os.path.join(cfg.out, "ppo", "metrics.jsonl"))
    if rows and rank() == 0:
        print(f"ppo: {state['step']} steps; RM score {rows[0]['rm_score_mean']:.3f} -> {rows[-1]['rm_score_mean']:.3f}, "
              f"KL {rows[-1]['kl']:.2f}, EOS rate {rows[0]['eos_rate']:.2f} -> {rows[-1]['eos_rate']:.2f}, "
              f"response length {rows[0]['response_length']:.0f} -> {rows[-1]['response_length']:.0f}")



# -----------------------------------------------------------------------------
# the paper's evaluations (eval.py) and the report

def stage_eval(cfg):
    """The evaluation suite on the pipeline's models, the paper's table: the base model, the SFT policy and the PPO
    policy as judges on static HHH and TruthfulQA; on Vicuna-80 each against the SFT policy, judged by step 1's
    reward model; the reward model on static HHH and the HH test splits."""
    assistant = parse_generator("--assistant", cfg.assistant, cfg.format)
    models = {"base": cfg.sft_model or assistant.model, "sft": os.path.join(cfg.out, "sft", "best"),
              "ppo": os.path.join(cfg.out, "ppo", "last", "policy")}
    if not os.path.isfile(os.path.join(models["sft"], "config.json")):
        raise UserError(f"{models['sft']}: no SFT policy to evaluate; run the sft (and ppo) stages first.")
    if not os.path.isfile(os.path.join(models["ppo"], "config.json")):
        del models["ppo"]
    new = cfg.eval_max_new_tokens or (120 if cfg.format == "story" else 1024)
    evaluate(EvalConfig(models=",".join(f"{k}={v}" for k, v in models.items()), vicuna_baseline="sft",
                        rm=cfg.reward_model, max_new_tokens=new, max_items=cfg.eval_max_items,
                        rm_sets=False, vicuna=cfg.eval_vicuna,   # the rm stage scored the reward models
                        out=os.path.join(cfg.out, "eval"), seed=cfg.seed, device=cfg.device))


def diversity(texts, n=4):
    """Distinct-1 and distinct-2 (unique word n-grams / all word n-grams over the texts), and the word n-gram found
    in the most texts with the share of texts that hold it: collapse onto one template shows in all three."""
    words = [t.lower().split() for t in texts]
    grams = lambda k: [tuple(w[i:i + k]) for w in words for i in range(len(w) - k + 1)]
    d = {f"distinct_{k}": len(set(grams(k))) / max(1, len(grams(k))) for k in (1, 2)}
    per_text = Counter(g for w in words for g in {tuple(w[i:i + n]) for i in range(len(w) - n + 1)})
    phrase, count = per_text.most_common(1)[0] if per_text else ((), 0)
    return {**d, "top_phrase": " ".join(phrase), "top_phrase_share": count / max(1, len(texts)), "texts": len(texts)}


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
            tc = rmlib.TrainConfig(data="x", model=cfg.rm_model or "x", preset=cfg.rm_preset)
            rmlib.check_config(tc)
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
    least = dict(SMALL, rl_prompts=PROFILES[cfg.profile]["ppo"].get("batch_size", 16))    # one rollout batch
    for k, (n, what, flag) in counts.items():
        if (which is None or k in which) and n < least[k]:
            out.append(f"warning: {n} {what}, fewer than the {least[k]} this step needs to mean something: raise "
                       f"{flag}.")
    return out


def verdict(key, claim, line, value, lo=None, hi=None, n=0, holds=None, share=True):
    """One "did it work?" verdict: what is claimed (a short name of the figure and the bar it must clear), its report
    line, its figure with a 95% interval over n items, and whether the claim held (False too where the data cannot
    tell; None: a figure that makes no claim). share: the figure is a share (written in %), else a score difference.
    verdicts.json keeps these for each run; seeds.py tabulates them."""
    if holds is not None:
        holds = bool(holds and n >= MIN_VERDICT_ITEMS)
    return dict(key=key, claim=claim, line=line, value=value, lo=lo, hi=hi, n=n, holds=holds, share=share)


def verdicts(cfg, rs, sft, ev, div=None):
    """"Did it work?": a verdict (above) per step against a baseline measured on the same items, with 95%
    intervals. div: the diversity of each policy's Vicuna-80 answers (diversity())."""
    out, pct = [], lambda p: f"{100 * p:.1f}%"
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
            out.append(verdict(f"rm_{split}", f"RM accuracy on {name} (> 50%)", line, m, lo, hi, n, holds=lo > 0.5))
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
                           a["accuracy"], lo, hi, a["n"], holds=lo > 0.5))
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
                           g, lo, hi, len(gains), holds=lo > 0, share=False))
    if sft and "scores" in sft.get("sft", {}) and "scores" in sft.get("sft_plain", {}):
        d = [a - b for a, b in zip(sft["sft"]["scores"], sft["sft_plain"]["scores"])]
        g, (lo, hi) = mean_interval(d)                          # paired: each query's difference
        text = decided('better' if lo > 0 else 'worse' if hi < 0 else 'no clear difference', len(d))
        line = (f"- Step 2, SFT on RM-guided against plain self-play, {len(d)} held-out queries: RM score {g:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}] (paired t interval): **{text}** (the same reward model judges).")
        out.append(verdict("sft_vs_plain", "SFT on RM-guided minus plain self-play, RM score (> 0)", line,
                           g, lo, hi, len(d), holds=lo > 0, share=False))
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
                           g, lo, hi, q, holds=lo > 0, share=False))
    if div and "sft" in div and "ppo" in div:
        r = div["ppo"]["distinct_2"] / max(div["sft"]["distinct_2"], 1e-9)
        text = "kept its diversity" if r >= 0.8 else "collapsed onto what the reward model likes"
        line = (f"- Step 3, diversity: PPO's distinct-2 is {r:.0%} of the SFT policy's "
                f"({div['ppo']['distinct_2']:.3f} vs {div['sft']['distinct_2']:.3f}); its most shared 4-gram, "
                f"\"{div['ppo']['top_phrase']}\", is in {div['ppo']['top_phrase_share']:.0%} of its answers: **{text}** "
                f"(80% of SFT's is the bar).")
        out.append(verdict("ppo_diversity", "PPO's distinct-2 over SFT's (>= 80%)", line, r, n=div["ppo"]["texts"],
                           holds=r >= 0.8))
    if ev and ev.get("vicuna", {}).get("ppo", {}).get("rm"):
        v = ev["vicuna"]["ppo"]["rm"]
        n = v["win"] + v["loss"]                                 # the pairs the reward model decides
        lo, hi = wilson(v["win"], n)
        text = decided("raised the reward on these unseen prompts" if lo > 0.5 else "lowered it" if hi < 0.5 else
                       "no clear change", n)
        line = (f"- Step 3, PPO against the SFT policy on Vicuna-80, judged by the reward model: {v['win']} / "
                f"{v['tie']} / {v['loss']} (mean score {v['mean_score']:.2f} vs {v['mean_score_baseline']:.2f}); "
                f"PPO's answer scores higher in {pct(v['win'] / max(n, 1))} [{pct(lo)}, {pct(hi)}] of the {n} decided "
                f"pairs: **{text}**. **Caveat: this judge is the reward model PPO optimised**; a higher score shows "
                f"the reward went up, not that the answers are better.")
        out.append(verdict("ppo_vicuna_rm", "PPO's answer above SFT's on Vicuna-80 by the RM (> 50%)", line,
                           v["win"] / max(n, 1), lo, hi, n, holds=lo > 0.5))
    if ev and ev.get("models"):
        for name, m in ev["models"].items():
            a, t = m["static_hhh"]["all"], m["truthfulqa_mc1"]
            lo, hi = a["ci95"]
            text = decided('above chance' if lo > 0.5 else 'not distinguishable from chance', a["n"])
            line = (f"- Evaluation, {name} as judge on static HHH ({a['n']} items): {pct(a['accuracy'])} "
                    f"[{pct(lo)}, {pct(hi)}]: **{text}**; TruthfulQA MC1 {pct(t['accuracy'])}.")
            out.append(verdict(f"judge_{name}", f"{name} as judge on static HHH (> 50%)", line, a["accuracy"],
                               lo, hi, a["n"], holds=lo > 0.5))
            out.append(verdict(f"truthfulqa_{name}", f"TruthfulQA MC1, {name} (no claim)", "", t["accuracy"],
                               *t.get("ci95", (None, None)), n=t.get("n", 0)))
    return out


def stage_report(cfg):
    """out/report.md: does each step work (a verdict against a baseline, with intervals), samples before and after
    self-play and PPO, the diversity of the policies' answers, the figures of every stage (a table, also printed),
    and SVG charts of the PPO curves and the reward models' accuracy."""
    j = lambda f: read_json(os.path.join(cfg.out, f)) if os.path.isfile(os.path.join(cfg.out, f)) else None
    rows = []
    cs, rs, sp, sft, ev, tm = (j("compare_stats.json"), j("rm_stats.json"), j("selfplay_stats.json"),
                               j("sft_stats.json"), j(os.path.join("eval", "results.json")), j("timings.json"))
    ppo_rows = read_records(os.path.join(cfg.out, "ppo", "metrics.jsonl"))
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
    if ppo_rows:
        a, b = ppo_rows[:5], ppo_rows[-5:]
        m = lambda rr, k: sum(r[k] for r in rr) / len(rr)
        rows.append(("PPO: RM score first 5 -> last 5 steps", f"{m(a, 'rm_score_mean'):.3f} -> {m(b, 'rm_score_mean'):.3f}"))
        rows.append(("PPO: KL (last 5 steps), generation share of a step", f"{m(b, 'kl'):.1f} nats, {m(ppo_rows, 'gen_time_share'):.0%}"))
    answers = {n: [r["text"] for r in read_records(os.path.join(cfg.out, "eval", "vicuna", f"{n}.jsonl"))]
               for n in ("base", "sft", "ppo")}
    answers = {n: a for n, a in answers.items() if a}
    div = {n: diversity(a) for n, a in answers.items()}
    for n, d in div.items():
        rows.append((f"diversity of {n}'s Vicuna-80 answers: distinct-1 / distinct-2 / most shared 4-gram",
                     f"{d['distinct_1']:.3f} / {d['distinct_2']:.3f} / \"{d['top_phrase']}\" in "
                     f"{d['top_phrase_share']:.0%} of answers"))
    if tm:
        rows.append(("wall time", ", ".join(f"{k} {v:.0f}s" for k, v in tm.items())))
    table = "| figure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
    md = ["# ALMoST run report", "", f"Output folder `{cfg.out}`, profile `{cfg.profile}`.", ""]
    warnings = small_data_warnings(cfg)
    if warnings:
        md += ["**Too little data for some steps: their verdicts below are not evidence.**", ""] + \
              [f"- {w.removeprefix('warning: ')}" for w in warnings] + [""]
    md += ["## Did it work?", ""]
    vs = verdicts(cfg, rs, sft, ev, div)
    verdict_lines = [v["line"] for v in vs if v["line"]]
    md += verdict_lines or ["(no stage has run yet)"]
    md += ["", "## Figures", "", table]
    if answers:
        qs = read_records(os.path.join(DATA, "vicuna_bench", "question.jsonl"))
        md += ["## Samples: the same questions before and after self-play and PPO", ""]
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
    if ev:
        md += ["## Evaluation", "", results_markdown(ev)]
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
    write_text(os.path.join(cfg.out, "report.md"), "\n".join(md))
    write_json(os.path.join(cfg.out, "verdicts.json"), vs)
    print(table, end="")
    print("\n".join(verdict_lines))
    print(f"report -> {os.path.join(cfg.out, 'report.md')}")


def shared_prefix_tokens(model, g, fmt):
    """Tokens of the few-shot prompt every row of generator g starts with (0: none, or no tokenizer in `model`)."""
    if g is None or fmt != "dialogue" or not os.path.isfile(os.path.join(model, "config.json")):
        return 0
    from tokenizer import Tokenizer
    try:
        tok = Tokenizer(model)
    except UserError:
        return 0
    demos = read_demos(g.prompt_file)   # what the sampler will share: the common start of two rows' prompts
    return shared_prefix_length([turn_prompt(tok, fmt, *demos, g.shots, [("user", q)]) for q in ("Yes?", "No.")])


def print_plan(cfg, stages):
    """The dry run: what each stage would do and roughly how many tokens it would generate."""
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
            p = dict(PROFILES[cfg.profile]["ppo"], **({"steps": cfg.ppo_steps} if cfg.ppo_steps else {}))
            t = p["steps"] * p["batch_size"] * p["max_new_tokens"]
            line = (f"{p['steps']} steps x {p['batch_size']} rollouts from {os.path.join(cfg.out, 'sft', 'best')}, "
                    f"<= {t:,} tokens")
        elif s == "eval":
            t = 3 * 80 * (120 if cfg.format == "story" else 1024)
            line = f"static HHH, HH, TruthfulQA MC1, Vicuna-80 (base, SFT, PPO), <= {t:,} tokens"
        else:
            t, line = 0, {"compare": "the comparison rule (no sampling)", "check": "judge NLL of every answer",
                          "rm": f"reward model(s) from {cfg.rm_model}", "sft": "SFT of the assistant model, 2 runs",
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
        ctx = memory.model_config(model).max_position_embeddings
        shared = min(shared_prefix_tokens(model, g, cfg.format) for _, g in uses)
        memory_dry_run(cfg, model, "sample", cfg.batch_size, ctx, shared=shared)
        print(f"  (used by: {', '.join(u for u, _ in uses)}; " +
              (f"a prompt prefix of {shared} tokens shared by every row)" if shared else "no shared prefix counted)"))
    # memory per GPU of the trainer stages: each trainer's own dry run (cfg.dry_run is on), as the stage would call it
    if "rm" in stages:
        rmlib.train(rmlib.TrainConfig(model=cfg.rm_model, preset=cfg.rm_preset, seed=cfg.seed, **scale_flags(cfg)))
    base = cfg.sft_model or (cfg.assistant and parse_generator("--assistant", cfg.assistant, cfg.format).model)
    if "sft" in stages:
        sftlib.train(sft_config(cfg, "", os.path.join(cfg.out, "sft"), base))
    if "ppo" in stages:   # the SFT policy does not exist yet: its base stands in (same shape)
        ppolib.train(ppo_config(cfg, base, os.path.join(cfg.out, "ppo_prompts.jsonl")))



# -----------------------------------------------------------------------------
# main

TRAINER_STAGES = ("rm", "sft", "ppo")
STAGES = {"queries": stage_queries, "responses": stage_responses, "compare": stage_compare, "check": stage_check,
          "rm": stage_rm, "selfplay": stage_selfplay, "sft": stage_sft, "ppo": stage_ppo, "eval": stage_eval,
          "report": stage_report}


def main(argv):
    if argv and argv[0] == "eval":
        raise UserError("the evaluation suite moved to eval.py: python eval.py --models=NAME=FOLDER,... --rm=FOLDER "
                        "(python eval.py --help lists its flags).")
    cfg = resolve(parse_args(Config, argv))
    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise UserError(f"--stages: unknown stage {s!r}; stages are {', '.join(STAGES)}.")
    if cfg.profile == "paper" and not cfg.query_model and "queries" in stages:
        raise UserError("--query_model is required for the paper profile: a LLaMA folder (the paper used the "
                        "vanilla base model).")
    if cfg.profile == "paper" and not cfg.rm_model and ("rm" in stages or "check" in stages):
        raise UserError("--rm_model is required for the paper profile: the base LLaMA folder the RM starts from "
                        "(the check stage uses it as the judge).")
    if {"responses", "compare"} & set(stages):   # configuration mistakes surface before any work is done
        parse_rubric(cfg.rubric, parse_generators(cfg.generators, cfg.format))
    if {"selfplay", "sft"} & set(stages):
        for flag, spec in (("--assistant", cfg.assistant), ("--user", cfg.user)):
            if not spec:
                raise UserError(f"{flag} is required for step 2 with this profile: MODEL:PROMPT_FILE:SHOTS"
                                f"[:MAX_NEW_TOKENS] (or leave selfplay and sft out of --stages).")
            parse_generator(flag, spec, cfg.format)
    if cfg.dry_run:
        return print_plan(cfg, stages)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and set(stages) - set(TRAINER_STAGES):
        raise UserError(f"under torchrun, run only the trainer stages ({', '.join(TRAINER_STAGES)}), e.g. "
                        f"--stages=sft; the sampling stages run in one process (python almost.py --stages=...).")
    with out_lock(cfg.out):        # one run per output folder; --out checked before any model loads
        run_stages(cfg, stages)


def run_stages(cfg, stages):
    _, _, dev = setup_distributed(cfg.device)
    cfg.device = str(dev)
    if rank() == 0:
        write_json(os.path.join(cfg.out, "almost_config.json"), asdict(cfg))
    tpath = os.path.join(cfg.out, "timings.json")
    timings = read_json(tpath) if os.path.isfile(tpath) else {}
    for s in stages:
        t0 = time.time()
        STAGES[s](cfg)
        timings[s] = round(time.time() - t0, 1)
        if rank() == 0:
            write_json(tpath, timings)
            print(f"[{s}: {timings[s]:.1f}s]" + (f" on {world_size()} processes" if world_size() > 1 else ""))
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
