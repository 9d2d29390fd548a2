"""
The ALMoST pipeline: the paper's three steps as stages that talk through files in --out (default out/).

    python almost.py                                   # the bundled story profile, 7-16 minutes on 2 CPU cores
    python almost.py --stages=compare,rm               # rerun some stages; each skips work already on disk
    python almost.py --profile=chat --model=SMOLLM2    # one real chat model in every role, about 40 minutes on CPU
    python almost.py --profile=paper --query_model=LLAMA --generators=NAME=LLAMA:PROMPT_FILE:SHOTS,... \
                     --rubric="A>B>C" ...              # the paper's setting on LLaMA folders you supply

| paper step                               | stage     | code                          | writes                        |
|------------------------------------------|-----------|-------------------------------|-------------------------------|
| 1a initial queries (10-shot, ROUGE-L)    | queries   | comparisons.query_stream      | queries.jsonl, rl_queries.jsonl |
| 1b prompted responses (+ BAD rules)      | responses | comparisons.stage_responses   | responses.jsonl               |
| 1c synthetic comparisons (filter rule)   | compare   | comparisons.make_comparisons  | comparisons(_nofilter).jsonl, compare_stats.json |
| 1  is the rubric's ranking true here?    | check     | report.stage_check            | check_stats.json              |
| 1d Bradley-Terry reward model            | rm        | rm.py (stage_rm below)        | rm/, rm_nofilter/, rm_stats.json |
| 2  RM-guided self-play (best of N)       | selfplay  | selfplay.best_of_n_turn       | selfplay_n{N}.jsonl, selfplay_n1.jsonl, selfplay_stats.json |
| 2  SFT on the dialogues                  | sft       | sft.py (stage_sft below)      | sft/, sft_plain/, sft_stats.json |
| 3  RL from synthetic feedback            | ppo       | ppo.py (stage_ppo below)      | ppo_prompts.jsonl, ppo/       |
| 3  without RL: DPO on the same feedback  | dpo       | dpo.py (stage_dpo below)      | dpo_answers.jsonl, dpo_pairs.jsonl, dpo/ |
|    the paper's evaluations               | eval      | eval.py (stage_eval below)    | eval/results.json, eval/results.md |
|    a summary with charts                 | report    | report.stage_report           | report.md, report_*.svg, verdicts.json |

queries.jsonl, responses.jsonl and the self-play files are append-only, flushed per record (self-play: per batch
of dialogues): a killed stage loses at most what was in flight, and a rerun skips what is on disk. The trainers
resume from their last/ checkpoints.
"""
import copy
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar, Optional

import torch
from tqdm import tqdm

import dpo as dpolib
import ppo as ppolib
import rm as rmlib
import sft as sftlib
from common import (RecordWriter, UserError, derive_seed, model_folder, out_lock, parse_args, rank, read_json,
                    read_records, run_cli, user_set, world_size, write_json, write_jsonl)
from comparisons import (QUERY_STOPS, Generator, parse_generator, parse_generators, parse_rubric,
                         stage_compare, stage_queries, stage_responses)
from eval import RM_SETS, Config as EvalConfig, evaluate
from model import free_memory, load
from report import print_plan, rm_eval_pairs, stage_check, stage_report, warn
from selfplay import compare_policies, stage_selfplay
from trainer import ScaleConfig, barrier, end_distributed, setup_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
# profiles: the paper's generators on LLaMA folders you supply, or the bundled story models

DATA = os.path.join(HERE, "data")
STORIES260K, STORIES50K = os.path.join(DATA, "stories260K"), os.path.join(DATA, "stories50K")
GOOD_STORIES, PLAIN_STORIES = os.path.join(DATA, "stories", "good_stories.txt"), os.path.join(DATA, "stories",
                                                                                              "plain_stories.txt")
HHH, FAITHFUL = os.path.join(DATA, "almost", "HHH_prompt.txt"), os.path.join(DATA, "almost", "Faithful_prompt.txt")
MODEL = "{model}"   # the chat profile's stand-in for --model


@dataclass
class Profile:
    """Every setting a run takes from its profile unless a flag says otherwise: each field is the flag of that name;
    run holds more almost.py flags; rm, sft and ppo are the trainers' own configs, whose fields --rm.FLAG, --sft.FLAG
    and --ppo.FLAG set."""
    format: str                     # "story" or "dialogue": the prompts' and answers' shape
    seeds: str                      # 1a: the seed pool
    n_queries: int                  # 1a: self-play's queries (10% held out)
    n_rl_queries: int               # 1a: PPO's prompts, a set of their own
    queries_per_prompt: int         # 1a: samples drawn from one 10-shot prompt
    query_model: str                # 1a: the model that writes queries ("": --query_model is required)
    generators: list                # 1b: the prompted configurations (comparisons.Generator), ranked by the rubric
    rubric: str                     # 1c: generator names best first, ">" between ranks
    assistant: Optional[Generator]  # 2: the assistant of self-play (its model is also SFT's base)
    user: Optional[Generator]       # 2: the model that plays the human
    rm: rmlib.TrainConfig           # 1d: rm.py's config (its model: the reward model's base)
    sft: sftlib.Config              # 2: sft.py's config (its model "": the assistant's)
    ppo: ppolib.Config              # 3: ppo.py's config
    dpo: dpolib.Config              # 3 without RL: dpo.py's config
    run: dict = field(default_factory=dict)   # more almost.py flags


PROFILES = {
    # the paper: dialogue prompts (HHH / Faithful), "Query:" lines for query generation; models are the user's
    "paper": Profile(format="dialogue", seeds=os.path.join(DATA, "almost", "seed_prompts.txt"), n_queries=10000,
                     n_rl_queries=10000, queries_per_prompt=1, query_model="", generators=[], rubric="", assistant=None,
                     user=None, rm=rmlib.TrainConfig(), sft=sftlib.Config(),
                     ppo=ppolib.Config(steps=1000, lr=1e-6, value_lr=1e-6, batch_size=64, minibatch=8,
                                       max_new_tokens=256), dpo=dpolib.Config()),
    # the bundled story domain (README, "The story profile"): queries are story openings, responses continue
    # them, demonstrations are short stories; the generators differ in model size, shots and demo quality
    "stories": Profile(
        format="story", seeds=os.path.join(DATA, "stories", "seed_openings.txt"), n_queries=300, n_rl_queries=200,
        queries_per_prompt=32, query_model=STORIES260K,
        generators=[Generator("260K-good-2shot", STORIES260K, GOOD_STORIES, shots=2, max_new_tokens=160),
                    Generator("260K-plain-1shot", STORIES260K, PLAIN_STORIES, shots=1, max_new_tokens=160),
                    Generator("50K-plain-1shot", STORIES50K, PLAIN_STORIES, shots=1, max_new_tokens=160),
                    Generator("50K-0shot", STORIES50K, "", shots=0, max_new_tokens=160)],
        rubric="260K-good-2shot>260K-plain-1shot>50K-plain-1shot>50K-0shot",
        rm=rmlib.TrainConfig(**rmlib.PRESETS["tiny"]),   # (python rm.py's settings for the bundled model)
        # step 2: stories260K with one good demonstration continues the story; stories260K plays the user by adding
        # the next sentence; SFT settings for a 260K model on CPU
        assistant=Generator("assistant", STORIES260K, GOOD_STORIES, shots=1, max_new_tokens=120),
        user=Generator("user", STORIES260K, "", shots=0, max_new_tokens=40),
        # the reward models on 500 evenly spaced pairs of each HH test split (a 95% interval of +-4.4 points), the
        # policies on 200 items of each evaluation set; --eval_rm_items=0 --eval_max_items=0: every item
        run=dict(eval_rm_items=500, eval_max_items=200),
        sft=sftlib.Config(lr=5e-4, batch_size=16, micro_batch=16, epochs=3.0, eval_every=10),
        # PPO: responses as long as the evaluations' (120 tokens), rarely a finished story, so a cut one keeps its RM
        # score, read back to its last full sentence (trim_cut); beta adapts towards 4 nats; two passes a batch and an
        # entropy bonus keep the answers off one phrase (docs/results.md; docs/notes/ has the rounds that found them)
        ppo=ppolib.Config(steps=80, lr=5e-5, value_lr=3e-4, batch_size=16, minibatch=8, ppo_epochs=2, ent_coef=0.1,
                          max_new_tokens=120, beta=0.15, kl_target=4.0, kl_horizon=640, penalize_missing_eos=False,
                          trim_cut=True),
        # DPO: the SFT policy's best and worst of 4 answers to each RL prompt by the reward model (as long as PPO's
        # rollouts, a cut one back to its last full sentence); settings for a 260K model on CPU (docs/results.md)
        dpo=dpolib.Config(lr=1e-4, beta=0.1, batch_size=16, micro_batch=8, epochs=2.0, warmup=0.1, eval_every=10,
                          log_every=2)),
    # the paper's method on one real chat model (--model, e.g. SmolLM2-135M-Instruct) sized for 2 CPU cores: the
    # paper's prompt files and seed queries; generators differ in prompt quality (the long, well-formatted Faithful
    # dialogues vs the HHH ones) and shots. One model offers no size axis. MODEL stands for --model.
    "chat": Profile(
        format="dialogue", seeds=os.path.join(DATA, "almost", "seed_prompts.txt"), n_queries=60, n_rl_queries=50,
        queries_per_prompt=1, query_model=MODEL,
        generators=[Generator("faithful-3shot", MODEL, FAITHFUL, shots=3, max_new_tokens=128),
                    Generator("hhh-3shot", MODEL, HHH, shots=3, max_new_tokens=128),
                    Generator("hhh-0shot", MODEL, HHH, shots=0, max_new_tokens=128)],
        rubric="faithful-3shot>hhh-3shot>hhh-0shot", rm=rmlib.TrainConfig(model=MODEL, **rmlib.PRESETS["chat"]),
        assistant=Generator("assistant", MODEL, FAITHFUL, shots=3, max_new_tokens=128),
        user=Generator("user", MODEL, HHH, shots=1, max_new_tokens=40),
        run=dict(turns=1, trim_cut=True, eval_max_items=100, eval_rm_items=221, eval_vicuna=False),
        sft=sftlib.Config(lr=2e-5, batch_size=8, micro_batch=4, epochs=2.0, eval_every=5, max_length=384),
        # PPO: 64-token responses rarely reach EOS, so a truncated one keeps its RM score (as stories)
        ppo=ppolib.Config(steps=12, lr=2e-6, value_lr=2e-5, batch_size=8, minibatch=4, ppo_epochs=2, max_new_tokens=64,
                          beta=0.1, kl_target=4.0, kl_horizon=96, penalize_missing_eos=False),
        dpo=dpolib.Config(lr=2e-6, beta=0.1, batch_size=8, micro_batch=2, epochs=1.0, max_length=384, eval_every=5,
                          log_every=1)),
}


@dataclass
class Config(ScaleConfig):   # device, dtype, LoRA, gradient checkpointing, FSDP (trainer.py), for every trainer stage
    profile: str = "stories"        # "stories" (bundled), "chat" (one chat model: --model) or "paper"
    model: str = ""                 # the chat profile's model folder: it plays every role (SmolLM2-135M-Instruct, say)
    out: str = "out"                # the folder every stage reads and writes
    stages: str = "queries,responses,compare,check,rm,selfplay,sft,ppo,dpo,eval,report"  # stages to run, in order
    n_queries: int = 0              # 0 = the profile's (stories 300, paper 10000): self-play's, 10% held out
    n_rl_queries: int = 0           # 0 = the profile's (stories 200, chat 50, paper 10000): PPO's prompts (1a's rules)
    queries_per_prompt: int = 0     # 1a: samples from one draw of 10 shots (0 = the profile's: 1, as the authors;
                                    # stories 32)
    trim_cut: bool = False          # 1b, 2: a turn cut by the token budget goes back to its last full sentence
    query_line: str = "authors"     # 1a, dialogue format: "authors" (first line starting "Query:") or "first" line
    seeds: str = ""                 # seed pool file ("" = the profile's); its first line is an instruction line
    query_model: str = ""           # "" = the profile's
    generators: str = ""            # NAME=MODEL:PROMPT_FILE:SHOTS[:MAX_NEW_TOKENS],...  ("" = the profile's)
    rubric: str = ""                # config names best first, ">" between ranks, "=" inside one: "A>B=C>D"
    rm_filter_ablation: bool = True  # also train a reward model without the length rule
    judge: str = ""                 # check: the LLM that judges the rubric's pairs (dialogue format; "" = --rm.model)
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
    eval_max_items: int = 0         # cap every evaluation set at this many items (0 = all; the story profile: 200)
    eval_rm_items: int = -1         # the reward models' pairs of static HHH and each HH test split, evenly spaced
                                    # (-1: as --eval_max_items, which given alone caps them too; 0: all)
    eval_vicuna: bool = True        # Vicuna-80 answers of every policy, judged by the reward model
    eval_max_new_tokens: int = 0    # Vicuna-80 answers' length at most (0 = the profile's: stories 120, else 1024)
    dry_run: bool = False           # print the plan (stages, models, counts, tokens to generate) and stop
    batch_size: int = 32            # prompts per sampler call
    seed: int = 1337                # every random stream of the run derives from it (and each trainer's --seed)
    # step 3 without RL
    dpo_pairs: str = "onpolicy"     # DPO's pairs: "onpolicy" (the SFT policy's best and worst answers to each RL
                                    # prompt by the reward model) or "synthetic" (step 1's comparisons)
    dpo_n: int = 4                  # onpolicy: answers per RL prompt, at most --ppo.max_new_tokens long (as PPO's)
    # each trainer's flags, as the trainer spells them (python rm.py --help, sft.py --help, ppo.py --help) after its
    # name and a dot: --rm.lr=1e-4 --ppo.kl_target=6; they win over the profile and the scale flags above
    rm: rmlib.TrainConfig = field(default_factory=rmlib.TrainConfig)   # the reward models (both): --rm.FLAG
    sft: sftlib.Config = field(default_factory=sftlib.Config)          # both SFT runs: --sft.FLAG
    ppo: ppolib.Config = field(default_factory=ppolib.Config)          # the PPO run: --ppo.FLAG
    dpo: dpolib.Config = field(default_factory=dpolib.Config)          # the DPO run: --dpo.FLAG
    # flags of another spelling: the message names this one
    RENAMED: ClassVar[dict] = {
        **{f"sft_{a}": f"--sft.{b}" for a, b in (("lr", "lr"), ("batch", "batch_size"), ("micro_batch", "micro_batch"),
                                                 ("epochs", "epochs"), ("max_length", "max_length"),
                                                 ("eval_every", "eval_every"), ("model", "model"))},
        "ppo_steps": "--ppo.steps", "ppo_lr": "--ppo.lr", "rm_model": "--rm.model",
        "rm_preset": "--rm.FLAG for each of rm.py's settings (the profile holds them)",
        **{f"{t}_args": f"--{t}.FLAG=VALUE for each of {t}.py's flags" for t in ("rm", "sft", "ppo")}}


TRAINERS = ("rm", "sft", "ppo", "dpo")
PIPELINE_OWNED = ("data", "val_data", "out", "policy", "rm", "prompts", "dry_run", "seed", "preset")


def trainer_configs(cfg, prof):
    """Each trainer's config: the profile's, the pipeline's scale flags (device, dtype, LoRA, ...) over it, and the
    --rm.FLAG / --sft.FLAG / --ppo.FLAG given over those. The files and folders that connect the stages, and the seed,
    are the pipeline's."""
    for t in TRAINERS:
        mine = copy.deepcopy(getattr(prof, t))
        for f in fields(ScaleConfig):
            setattr(mine, f.name, getattr(cfg, f.name))
        given = getattr(cfg, t)
        for name in sorted(f.name for f in fields(given) if user_set(given, f.name, f"{t}.{f.name}", cfg)):
            if name in PIPELINE_OWNED:
                raise UserError(f"--{t}.{name}: set by the pipeline (the stages read each other's files, --seed seeds "
                                f"every trainer, the profile holds rm.py's settings); leave it out.")
            setattr(mine, name, getattr(given, name))
        mine.seed = cfg.seed
        if hasattr(mine, "model"):
            mine.model = model_folder(mine.model.replace(MODEL, cfg.model), f"--{t}.model", weights=not cfg.dry_run)
        setattr(cfg, t, mine)


def resolve(cfg):
    """Fill the profile's defaults into the fields left empty."""
    if cfg.profile not in PROFILES:
        raise UserError(f"--profile={cfg.profile!r}: use one of {', '.join(PROFILES)}.")
    prof = PROFILES[cfg.profile]
    if cfg.profile == "chat":
        if not cfg.model:
            raise UserError("--profile=chat needs --model: a chat model folder (a LLaMA-family HF folder, "
                            "SmolLM2-135M-Instruct say); it plays every role.")
        cfg.model = model_folder(cfg.model, "--model")
        if not os.path.isfile(os.path.join(cfg.model, "config.json")):
            raise UserError(f"--model={cfg.model}: no config.json there. Point it at a model folder.")
        if ":" in cfg.model or "," in cfg.model:
            raise UserError(f"--model={cfg.model}: a path with ':' or ',' cannot stand in a generator spec; "
                            f"move or link the folder.")
    for k in ("seeds", "query_model", "generators", "rubric", "n_queries", "n_rl_queries", "queries_per_prompt",
              "assistant", "user"):
        if not getattr(cfg, k):
            v = getattr(prof, k)
            if k == "generators":   # the flags' spelling of the records: NAME=MODEL:PROMPT_FILE:SHOTS:MAX_NEW_TOKENS
                v = ",".join(f"{g.name}={g.spec()}" for g in v)
            elif k in ("assistant", "user"):
                v = v.spec() if v else ""
            setattr(cfg, k, v.replace(MODEL, cfg.model) if isinstance(v, str) else v)
    for k, v in prof.run.items():
        if not user_set(cfg, k):   # flags given on the command line win, whatever their value
            setattr(cfg, k, v)
    if cfg.queries_per_prompt < 1:
        raise UserError(f"--queries_per_prompt={cfg.queries_per_prompt}: use 1 (a draw of shots for every sample) "
                        f"or more.")
    if user_set(cfg, "eval_max_items") and not user_set(cfg, "eval_rm_items"):
        cfg.eval_rm_items = -1     # a cap given for the evaluation sets holds for the reward models' sets too
    if cfg.rm_checkpoint not in ("last", "best"):
        raise UserError(f"--rm_checkpoint={cfg.rm_checkpoint!r}: use last or best.")
    trainer_configs(cfg, prof)
    for k in ("query_model", "judge", "reward_model"):   # a hub id: its cached folder
        setattr(cfg, k, model_folder(getattr(cfg, k), f"--{k}", weights=not cfg.dry_run))
    cfg.reward_model = cfg.reward_model or os.path.join(cfg.out, "rm", cfg.rm_checkpoint)
    cfg.format = prof.format
    if cfg.dpo_pairs not in ("onpolicy", "synthetic"):
        raise UserError(f"--dpo_pairs={cfg.dpo_pairs!r}: use onpolicy or synthetic.")
    if cfg.query_line not in QUERY_STOPS:
        raise UserError(f"--query_line={cfg.query_line!r}: use one of {', '.join(QUERY_STOPS)}.")
    return cfg


# -----------------------------------------------------------------------------
# the stages: step 1's and step 2's sampling stages live in comparisons.py and selfplay.py, the check and the
# report in report.py; the trainer stages below hand rm.py, sft.py and ppo.py their configs

def rm_config(cfg, data, val_data, out):
    """rm.py's Config for the rm stage: the run's (trainer_configs) with the stage's files."""
    return replace(cfg.rm, data=data, val_data=val_data, out=out)


def stage_rm(cfg):
    """1d: one held-out split by query for both reward models (with and without the length rule), each trained by
    rm.py, then scored on the held-out pairs, static HHH and the HH test splits (rm_stats.json)."""
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
        warn(cfg, ["pairs", "rm_steps", "held_out_pairs"])   # before the training is spent
    variants = ["filter", "nofilter"] if cfg.rm_filter_ablation else ["filter"]
    stats = {}
    for k in variants:
        out = os.path.join(cfg.out, "rm" if k == "filter" else "rm_nofilter")
        rmlib.train(rm_config(cfg, os.path.join(data_dir, f"train_{k}.jsonl"),
                              os.path.join(data_dir, "val_filter.jsonl"), out))
        if rank() != 0:   # under torchrun process 0 alone scores the reward model; the others wait for it
            barrier()
            continue
        model = rmlib.RewardModel.from_pretrained(os.path.join(out, cfg.rm_checkpoint), device=cfg.device)
        s = {}
        for name, path in [("held_out", os.path.join(data_dir, "val_filter.jsonl")),
                           ("held_out_nofilter", os.path.join(data_dir, "val_nofilter.jsonl")), *RM_SETS.items()]:
            ps = rm_eval_pairs(cfg, name, path)
            s[name] = rmlib.evaluate_pairs(model, rmlib.tokenize_pairs(model, ps, path))
        model = None                                  # gone before the next reward model trains
        stats[k] = s
        print(f"rm ({'with' if k == 'filter' else 'without'} the length rule): held-out accuracy "
              f"{s['held_out']['accuracy']:.3f}, corr(score, length) {s['held_out']['length_corr']:.3f}, "
              f"static HHH {s['static_hhh']['accuracy']:.3f}, HH harmless {s['hh_harmless']['accuracy']:.3f}, "
              f"HH helpful {s['hh_helpful']['accuracy']:.3f}")
        barrier()
    if rank() == 0:
        write_json(os.path.join(cfg.out, "rm_stats.json"), stats)


def sft_config(cfg, data, out, base):
    """sft.py's Config for the sft stage: the run's (trainer_configs) with the stage's files and base model."""
    return replace(cfg.sft, data=data, model=base, out=out)


@torch.no_grad()
def stage_sft(cfg):
    """SFT on the RMSP dialogues (-> sft/) and on the plain self-play ones (-> sft_plain/); then each policy
    answers the held-out queries (temperature 0.7, as the paper's Vicuna protocol) and the reward model scores
    the answers."""
    assistant = parse_generator("--assistant", cfg.assistant, cfg.format)
    base = cfg.sft.model or assistant.model
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
    policies = {"base": base, **{name: os.path.join(cfg.out, name, "best") for name in runs}}
    stats = compare_policies(cfg, policies, assistant.max_new_tokens, stats)
    write_json(os.path.join(cfg.out, "sft_stats.json"), stats)
    print("sft: mean RM score on held-out queries: " + ", ".join(f"{k} {v['mean_rm_score']:.3f}" for k, v in stats.items()))


# -----------------------------------------------------------------------------
# Step 3. RL from synthetic feedback: PPO (ppo.py) on the SFT policy against the reward model

def ppo_config(cfg, policy, prompts):
    """ppo.py's Config for the ppo stage: the run's (trainer_configs) with the stage's files."""
    return replace(cfg.ppo, policy=policy, rm=cfg.reward_model, prompts=prompts, out=os.path.join(cfg.out, "ppo"))


def stage_ppo(cfg):
    """PPO from step 2's SFT policy (out/sft/best) against step 1's reward model, on the RL prompts of step 1a
    (rl_queries.jsonl, none of them a self-play query; the held-out queries stay unseen). ppo.py resumes from
    out/ppo/last."""
    rl = read_records(os.path.join(cfg.out, "rl_queries.jsonl"))[:cfg.n_rl_queries]
    if len(rl) < cfg.n_rl_queries:
        raise UserError(f"{cfg.out}/rl_queries.jsonl holds {len(rl)} of --n_rl_queries={cfg.n_rl_queries} RL prompts: run "
                        f"the queries stage first (--stages=queries,...,ppo), in one process.")
    prompts = os.path.join(cfg.out, "ppo_prompts.jsonl")
    if rank() == 0:
        write_jsonl(prompts, [{"query": q["query"]} for q in rl])
        warn(cfg, ["rl_prompts"])
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


def dpo_config(cfg, policy, data, val_data):
    """dpo.py's Config for the dpo stage: the run's (trainer_configs) with the stage's files."""
    return replace(cfg.dpo, policy=policy, data=data, val_data=val_data, out=os.path.join(cfg.out, "dpo"))


@torch.no_grad()
def onpolicy_pairs(cfg, policy):
    """DPO's on-policy pairs: the SFT policy answers each RL prompt (rl_queries.jsonl) dpo_n times and the reward
    model scores the answers (dpo.scored_answers), appended to dpo_answers.jsonl a batch at a time (a rerun goes on);
    then each prompt's best and worst answers (dpo.best_and_worst) -> dpo_pairs.jsonl."""
    rl = read_records(os.path.join(cfg.out, "rl_queries.jsonl"))[:cfg.n_rl_queries]
    path = os.path.join(cfg.out, "dpo_answers.jsonl")
    done = {r["query_id"] for r in read_records(path)}
    todo = [q for q in rl if q["id"] not in done]
    if todo:
        model, tok = load(policy, device=cfg.device)
        reward_model = rmlib.RewardModel.from_pretrained(cfg.reward_model, device=cfg.device)
        per_call = max(1, cfg.batch_size // cfg.dpo_n)
        with RecordWriter(path) as w:
            for b in tqdm(range(0, len(todo), per_call), desc="dpo answers"):
                chunk = todo[b:b + per_call]
                seed = derive_seed(cfg.seed, "dpo_answers", chunk[0]["id"], bits=31)
                for q, r in zip(chunk, dpolib.scored_answers(model, tok, reward_model, [q["query"] for q in chunk],
                                                             cfg.dpo_n, cfg.ppo.max_new_tokens, seed,
                                                             cfg.dpo.chat_template)):
                    w.write({"query_id": q["id"], **r})
        model = reward_model = None
        free_memory()
    pairs = [p for r in read_records(path) for p in [dpolib.best_and_worst(r)] if p]
    write_jsonl(os.path.join(cfg.out, "dpo_pairs.jsonl"), pairs)
    return os.path.join(cfg.out, "dpo_pairs.jsonl")


def stage_dpo(cfg):
    """Step 3 without RL: DPO (dpo.py) from step 2's SFT policy (out/sft/best) on the pairs --dpo_pairs names:
    on-policy pairs (onpolicy_pairs, by step 1's reward model) or step 1's synthetic comparisons (the reward model's own
    training split and held-out pairs). dpo.py resumes from out/dpo/last."""
    policy = os.path.join(cfg.out, "sft", "best")
    if not os.path.isfile(os.path.join(policy, "config.json")):
        raise UserError(f"{policy}: no SFT policy; run the sft stage first (--stages=sft,dpo).")
    if cfg.dpo_pairs == "synthetic":
        data, val = (os.path.join(cfg.out, "rm_data", f"{k}_filter.jsonl") for k in ("train", "val"))
        if not os.path.isfile(data):
            raise UserError(f"{data}: no synthetic comparisons split; run the rm stage first (--stages=rm,dpo).")
    else:
        if len(read_records(os.path.join(cfg.out, "rl_queries.jsonl"))) < cfg.n_rl_queries:
            raise UserError(f"{cfg.out}/rl_queries.jsonl holds fewer than --n_rl_queries={cfg.n_rl_queries} RL prompts: "
                            f"run the queries stage first (--stages=queries,...,dpo).")
        data, val = (onpolicy_pairs(cfg, policy) if rank() == 0 else os.path.join(cfg.out, "dpo_pairs.jsonl")), ""
        barrier()
    state = dpolib.train(dpo_config(cfg, policy, data, val))
    rows = [r for r in read_records(os.path.join(cfg.out, "dpo", "metrics.jsonl")) if r["split"] == "val"]
    if rows and rank() == 0:
        print(f"dpo: {state['step']} steps on {cfg.dpo_pairs} pairs; held-out implicit reward accuracy "
              f"{rows[0]['accuracy']:.3f} -> {rows[-1]['accuracy']:.3f}, loss {rows[-1]['loss']:.4f}")


# -----------------------------------------------------------------------------
# the paper's evaluations (eval.py) and the report

def stage_eval(cfg):
    """The evaluation suite on the pipeline's models, the paper's table: the base model, the SFT policy and the PPO
    and DPO policies (those that exist) as judges on static HHH and TruthfulQA; on Vicuna-80 each against the SFT
    policy, judged by step 1's reward model (the rm stage scored the reward model on static HHH and HH)."""
    assistant = parse_generator("--assistant", cfg.assistant, cfg.format)
    models = {"base": cfg.sft.model or assistant.model, "sft": os.path.join(cfg.out, "sft", "best"),
              "ppo": os.path.join(cfg.out, "ppo", "last", "policy"), "dpo": os.path.join(cfg.out, "dpo", "last")}
    if not os.path.isfile(os.path.join(models["sft"], "config.json")):
        raise UserError(f"{models['sft']}: no SFT policy to evaluate; run the sft (and ppo, dpo) stages first.")
    models = {k: v for k, v in models.items() if k in ("base", "sft") or os.path.isfile(os.path.join(v, "config.json"))}
    new = cfg.eval_max_new_tokens or (120 if cfg.format == "story" else 1024)
    evaluate(EvalConfig(models=",".join(f"{k}={v}" for k, v in models.items()), vicuna_baseline="sft",
                        rm=cfg.reward_model, max_new_tokens=new, max_items=cfg.eval_max_items,
                        rm_sets=False, vicuna=cfg.eval_vicuna,   # the rm stage scored the reward models
                        out=os.path.join(cfg.out, "eval"), seed=cfg.seed, device=cfg.device))


def trainer_dry_runs(cfg, stages):
    """Each trainer stage's memory plan, its own dry run (cfg.dry_run is on) as the stage would call it."""
    base = cfg.sft.model or (cfg.assistant and parse_generator("--assistant", cfg.assistant, cfg.format).model)
    runs = {"rm": lambda: rmlib.train(rm_config(cfg, "", "", os.path.join(cfg.out, "rm"))),
            "sft": lambda: sftlib.train(sft_config(cfg, "", os.path.join(cfg.out, "sft"), base)),
            # the SFT policy does not exist yet: its base stands in (same shape)
            "ppo": lambda: ppolib.train(ppo_config(cfg, base, os.path.join(cfg.out, "ppo_prompts.jsonl"))),
            "dpo": lambda: dpolib.train(dpo_config(cfg, base, "", ""))}
    return [run for s, run in runs.items() if s in stages]


# -----------------------------------------------------------------------------
# main

TRAINER_STAGES = ("rm", "sft", "ppo", "dpo")
STAGES = {"queries": stage_queries, "responses": stage_responses, "compare": stage_compare, "check": stage_check,
          "rm": stage_rm, "selfplay": stage_selfplay, "sft": stage_sft, "ppo": stage_ppo, "dpo": stage_dpo,
          "eval": stage_eval, "report": stage_report}
WARN_AFTER = {"compare": ["pairs"], "selfplay": ["dialogues"]}   # the small-data warnings a stage's output can raise


def main(argv):
    cfg = resolve(parse_args(Config, argv))
    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise UserError(f"--stages: unknown stage {s!r}; stages are {', '.join(STAGES)}.")
    if cfg.profile == "paper" and not cfg.query_model and "queries" in stages:
        raise UserError("--query_model is required for the paper profile: a LLaMA folder (the paper used the "
                        "vanilla base model).")
    if cfg.profile == "paper" and not cfg.rm.model and ("rm" in stages or "check" in stages):
        raise UserError("--rm.model is required for the paper profile: the base LLaMA folder the RM starts from "
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
        return print_plan(cfg, stages, trainer_dry_runs(cfg, stages))
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
        barrier()   # under torchrun: where process 0 ends a stage alone (it compares the SFT policies), the others wait
        timings[s] = round(time.time() - t0, 1)
        if rank() == 0:
            warn(cfg, WARN_AFTER.get(s, []))
            write_json(tpath, timings)
            print(f"[{s}: {timings[s]:.1f}s]" + (f" on {world_size()} processes" if world_size() > 1 else ""))
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
