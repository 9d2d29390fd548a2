"""
Step 2 of ALMoST: reward-model-guided self-play (RMSP). A prompted assistant and a prompted user talk; at each
assistant turn the assistant writes n candidates and the reward model of step 1 keeps the best one that is not BAD
(best_of_n_turn). The dialogues become the demonstrations for supervised fine-tuning (sft.py); the same self-play
with n = 1 is the baseline that shows what the reward model's choice adds.

    queries.jsonl (first 90%) -> selfplay_n{N}.jsonl, selfplay_n1.jsonl -> sft/, sft_plain/ -> sft_stats.json
"""
import os
import statistics
import zlib
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

import torch
from tqdm import tqdm

import rm as rmlib
from common import RecordWriter, UserError, derive_seed, read_records, write_json
from comparisons import is_bad_response, parse_generator, speaker
from eval import policy_answers
from model import free_memory, load
from tokenizer import dialogue_text


def split_queries(cfg):
    """Step 1's queries: self-play uses the first 90%; the last 10% are held out to compare the SFT policies."""
    qs = read_records(os.path.join(cfg.out, "queries.jsonl"))[:cfg.n_queries]
    if len(qs) < 2:
        raise UserError(f"{cfg.out}/queries.jsonl has {len(qs)} queries: run the queries stage first.")
    k = max(1, len(qs) // 10)
    return qs[:-k], qs[-k:]


@dataclass
class Dialogue:
    query_id: int
    query: str
    turns: list                                     # [(role, text)], the user's query first
    candidates: list = field(default_factory=list)  # per assistant turn: [{"text", "score", "bad"(, "chosen")}]
    ended: bool = False
    no_room: str = ""                               # the turn the context window had no room for, if any

    def record(self, n):
        """The jsonl record; a dialogue ends with the assistant (a last user turn is dropped)."""
        turns = self.turns[:-1] if self.turns[-1][0] == "user" and len(self.turns) > 1 else self.turns
        return {"query_id": self.query_id, "query": self.query, "n": n,
                "turns": [{"role": r, "text": x} for r, x in turns], "usable": len(turns) > 1,
                "candidates": self.candidates, **({"no_room": self.no_room} if self.no_room else {})}


def best_of_n_turn(dialogues, candidates, reward_model, n):
    """RMSP's assistant turn: the reward model scores each dialogue's n candidates (candidates[i*n:(i+1)*n]) given the
    dialogue so far; the best candidate that is not BAD becomes the turn. A dialogue whose candidates are all BAD ends
    here. Every candidate is recorded in the dialogue with its score."""
    scores = reward_model.score([dialogue_text(d.turns) for d in dialogues for _ in range(n)], candidates).tolist()
    for i, d in enumerate(dialogues):
        cs, sc = candidates[i * n:(i + 1) * n], scores[i * n:(i + 1) * n]
        bad = [is_bad_response(c) for c in cs]
        pick = max((j for j in range(n) if not bad[j]), key=lambda j: sc[j], default=None)   # the best not BAD
        d.candidates.append([{"text": c, "score": x, "bad": y} for c, x, y in zip(cs, sc, bad)])
        if pick is None:
            d.ended = True
        else:
            d.candidates[-1][pick]["chosen"] = True
            d.turns.append(("assistant", cs[pick]))


def selfplay(queries, assistant, user, reward_model, n, turns, later_shots=-1, seed=0):
    """Step 2, RM-guided self-play (RMSP): a dialogue from each query ({"id", "query"}), up to `turns` assistant
    turns long. At each assistant turn the assistant (a comparisons.Speaker) writes n candidates in one sampler call
    and the reward model keeps the best one that is not BAD (best_of_n_turn); between them the user (a Speaker too)
    writes the human's next turn, and a dialogue whose user has nothing to say (under 10 characters) ends. Turn t
    samples with seed + t, its user turn with one more; after the first turn the assistant's prompt shows later_shots
    demonstrations (-1: as many as the first). A dialogue ends early where its prompt leaves no room in the context
    window (Dialogue.no_room). -> [Dialogue]"""
    dialogues = [Dialogue(q["id"], q["query"], [("user", q["query"])]) for q in queries]
    for t in range(turns):
        live = [d for d in dialogues if not d.ended]
        if not live:
            break
        s = (seed + t) % 2**31
        cands = assistant.speak([d.turns for d in live for _ in range(n)], "assistant", s,
                                None if t == 0 or later_shots < 0 else later_shots)
        for i, d in enumerate(live):
            if cands[i * n] is None:
                d.ended, d.no_room = True, f"assistant turn {t + 1}"
        live, cands = [d for d in live if not d.ended], [c for c in cands if c is not None]
        best_of_n_turn(live, cands, reward_model, n)
        if t == turns - 1:
            break
        live = [d for d in dialogues if not d.ended]
        for d, u in zip(live, user.speak([d.turns for d in live], "user", s + 1)):
            if u is None:
                d.ended, d.no_room = True, f"user turn {t + 2}"
            elif len(u) < 10:
                d.ended = True
            else:
                d.turns.append(("user", u))
    return dialogues


def selfplay_file(cfg, n, path, assistant, user, reward_model):
    """Self-play (selfplay) of the self-play queries not yet in `path`, best of n at each assistant turn, appended to
    `path` a chunk of dialogues at a time (their n candidates share one sampler call)."""
    queries, _ = split_queries(cfg)
    done = {r["query_id"] for r in read_records(path)}
    todo = [q for q in queries if q["id"] not in done]
    if not todo:
        print(f"selfplay n={n}: all {len(queries)} dialogues in {path}, skipping")
        return
    a_model, a_tok = load(assistant.model, device=cfg.device)
    u_model, u_tok = (a_model, a_tok) if user.model == assistant.model else load(user.model, device=cfg.device)
    a, u = speaker(assistant, a_model, a_tok, cfg.format, cfg.trim_cut), speaker(user, u_model, u_tok, cfg.format,
                                                                                  cfg.trim_cut)
    per_call = max(1, cfg.batch_size // n)
    with RecordWriter(path) as w:
        for b in tqdm(range(0, len(todo), per_call), desc=f"selfplay n={n}"):
            chunk = todo[b:b + per_call]
            seed = derive_seed(cfg.seed, "sampling", zlib.crc32(f"{n}".encode()) + chunk[0]["id"] * 31, bits=31)
            for d in selfplay(chunk, a, u, reward_model, n, cfg.turns, cfg.later_shots, seed):
                w.write(d.record(n))
    warn_no_room(read_records(path), n, a_model.config.context, assistant.shots)


def warn_no_room(records, n, ctx, shots):
    short = Counter(r["no_room"] for r in records if r.get("no_room"))
    if short:
        print(f"warning: selfplay n={n}: {sum(short.values())} of {len(records)} dialogues ended early because the "
              f"prompt left no room in the context window ({ctx} tokens) for " +
              ", ".join(f"{k} ({v})" for k, v in sorted(short.items())) +
              f". The prompt holds the preamble, {shots} demonstration(s) and the dialogue so far: use fewer "
              f"demonstrations after the first turn (--later_shots=K), fewer --turns, or a model with a longer "
              f"context.")


def stage_selfplay(cfg):
    assistant = parse_generator("--assistant", cfg.assistant, cfg.format)
    user = parse_generator("--user", cfg.user, cfg.format)
    reward_model = rmlib.RewardModel.from_pretrained(rmlib.RewardModel.check(cfg.reward_model, "--reward_model"),
                                                     device=cfg.device)
    for n in [cfg.n] + ([1] if cfg.selfplay_baseline and cfg.n != 1 else []):
        selfplay_file(cfg, n, os.path.join(cfg.out, f"selfplay_n{n}.jsonl"), assistant, user, reward_model)
    stats = selfplay_stats(read_records(os.path.join(cfg.out, f"selfplay_n{cfg.n}.jsonl")))
    write_json(os.path.join(cfg.out, "selfplay_stats.json"), stats)
    print(f"selfplay: {stats['dialogues']} dialogues ({stats['usable']} usable, {stats['assistant_turns']} "
          f"assistant turns); mean RM score of the chosen candidate {stats['chosen_score']:.3f} vs a random one "
          f"{stats['random_score']:.3f}; expected best of k: " +
          ", ".join(f"k={k} {v:.3f}" for k, v in stats["best_of_k"].items()))


def selfplay_stats(records):
    """The best-of-N gain: mean RM score of the chosen candidate vs a random (non-BAD) one, and the expected
    best score among k candidates drawn without replacement from each turn's non-BAD ones, for k = 1..N."""
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


@torch.no_grad()
def compare_policies(cfg, policies, max_new_tokens, stats):
    """After SFT: each policy ({name: folder}; the base model and the SFT policies) answers the held-out queries
    (temperature 0.7, as the paper's Vicuna protocol) and step 1's reward model scores the answers, into stats."""
    reward_model = rmlib.RewardModel.from_pretrained(rmlib.RewardModel.check(cfg.reward_model, "--reward_model"),
                                                     device=cfg.device)
    _, held = split_queries(cfg)
    model = tok = None
    for name, folder in policies.items():
        model = tok = None                            # one policy in memory at a time (and the reward model)
        free_memory()
        model, tok = load(folder, device=cfg.device)
        answers = policy_answers(model, tok, [q["query"] for q in held], max_new_tokens, cfg.seed)
        scores = reward_model.score([q["query"] for q in held], answers)
        stats.setdefault(name, {}).update({"held_out_queries": len(held), "mean_rm_score": scores.mean().item(),
                                           "scores": scores.tolist(),
                                           "bad_rate": statistics.fmean(is_bad_response(a) for a in answers),
                                           "example": answers[0]})
    return stats
