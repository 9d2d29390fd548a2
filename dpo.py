"""
DPO (Rafailov et al. 2023): step 3 without RL. The policy starts from the SFT policy of step 2 and learns from
preference pairs directly, with no reward model or sampling in the loop: the loss is the Bradley-Terry loss of step 1d
(rm.bt_loss) on the policy's implicit reward beta * log(pi(y|x) / pi_ref(y|x)), the reference being the SFT policy.

    python dpo.py --policy=out/sft/best --data=PAIRS.jsonl --out=out/dpo

A step, as train() runs it:
  1. reference    once, before the first step: each pair's summed response logprobs under the starting policy (the
                  reference), kept in out/reference_logprobs.json (exact for fixed pairs; no second model in memory)
  2. logprobs     the policy's summed response logprobs of the chosen and rejected answers, in one forward
                  (sequence_logprobs); the prompt's tokens carry no loss
  3. loss         dpo_loss: -log sigmoid(beta * ((logp_c - logp_r) - (ref_c - ref_r))), AdamW
  4. log, save    the implicit reward's accuracy and margin on the batch; held-out loss and accuracy every
                  --eval_every steps; best/ (lowest held-out loss) and last/ (the policy), HF folders; a rerun resumes
Pairs: any layout rm.py reads (TRL's {prompt, chosen, rejected}, conversations, Anthropic HH). almost.py's dpo stage
makes them from step 1's synthetic comparisons or on the policy (scored_answers, best_and_worst).
"""
import hashlib
import json
import os
import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import UserError, model_folder, out_lock, parse_args, rank, read_json, run_cli, write_json
from model import Llama, PAD_ID
from readers import read_pairs
from rm import bt_loss
from sample import generate
from tokenizer import Tokenizer, dialogue_ids, trim_to_sentence
from trainer import (ScaleConfig, all_sum, autocast, check_flags, compute_dtype, describe, end_distributed, epoch_batch,
                     from_master, load_dtype, lora_key, lr_at, make_optimizer, memory_dry_run, my_micro_batches,
                     optimizer_step, prepare_for_training, resume_from, save_training_checkpoint, set_lr,
                     setup_distributed, shard_bytes, start_or_resume)


# -----------------------------------------------------------------------------
# the method: the loss, the logprobs it reads, and on-policy pairs

def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """DPO's loss, -log sigmoid(beta * ((logp_c - logp_r) - (ref_c - ref_r))) per pair, from the summed response
    logprobs (B,) of the policy and of the reference: the Bradley-Terry loss (rm.bt_loss) on the implicit rewards
    r = beta * (logp - ref). Returns (the losses summed over the pairs, the implicit rewards of chosen and rejected,
    detached)."""
    r_chosen = beta * (logp_chosen - ref_chosen)
    r_rejected = beta * (logp_rejected - ref_rejected)
    return bt_loss(r_chosen, r_rejected, reduction="sum"), r_chosen.detach(), r_rejected.detach()


def sequence_logprobs(model, idx, rmask):
    """The sum of each row's response-token logprobs (B,) fp32: idx (B, T) right-padded rows (so causal attention needs
    no mask), rmask (B, T) True on the response tokens (the EOS too). Position t predicts token t+1; only the positions
    from the earliest response token's predecessor on go through the head."""
    start = int(rmask.float().argmax(-1).min())                              # the earliest response token
    logits = model(idx, logits=slice(start - 1, -1))                         # (B, T - start, V) fp32
    logp = logits.log_softmax(-1).gather(-1, idx[:, start:, None]).squeeze(-1)   # (B, T - start)
    return (logp * rmask[:, start:]).sum(-1)


@torch.no_grad()
def scored_answers(policy, tok, reward_model, prompts, n, max_new_tokens, seed, chat=False):
    """On-policy answers: the policy answers each prompt n times (THE sampler at temperature 1, top-k 0, top-p 1, as
    PPO's rollouts; the prompt as dpo.py encodes it) and the reward model scores each answer (normalised). DPO trains
    on answers that end (EOS), so an answer the budget cut goes back to its last full sentence, and one with no full
    sentence is left out (None, unscored) -> [{"prompt", "answers", "scores"}] a prompt."""
    ids = [dialogue_ids(tok, p, chat=chat) for p in prompts for _ in range(n)]
    outs, _ = generate(policy, ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
    texts = [tok.decode(o).strip() for o in outs]
    texts = [t if len(o) < max_new_tokens else trim_to_sentence(t).strip() if trim_to_sentence(t) != t else None
             for t, o in zip(texts, outs)]
    kept = [i for i, t in enumerate(texts) if t is not None]
    scores = [None] * len(texts)
    for i, s in zip(kept, reward_model.score([prompts[i // n] for i in kept], [texts[i] for i in kept],
                                             normalize=True).tolist() if kept else []):
        scores[i] = s
    return [{"prompt": p, "answers": texts[i * n:(i + 1) * n], "scores": scores[i * n:(i + 1) * n]}
            for i, p in enumerate(prompts)]


def best_and_worst(record):
    """An on-policy pair: the reward model's best and worst of a prompt's answers (a scored_answers record; answers
    left out are None) -> {"prompt", "chosen", "rejected", "margin"}, or None where they are the same text or score
    the same, or fewer than two answers are there."""
    ok = [i for i, t in enumerate(record["answers"]) if t is not None]
    if len(ok) < 2:
        return None
    s, t = record["scores"], record["answers"]
    hi, lo = max(ok, key=s.__getitem__), min(ok, key=s.__getitem__)
    if t[hi].strip() == t[lo].strip() or s[hi] <= s[lo]:
        return None
    return {"prompt": record["prompt"], "chosen": t[hi], "rejected": t[lo], "margin": s[hi] - s[lo]}


# -----------------------------------------------------------------------------
# config and data

@dataclass
class Config(ScaleConfig):   # device, dtype, LoRA, gradient checkpointing, FSDP: see trainer.py
    policy: str = ""               # the SFT policy (HF folder): where training starts, and the reference
    data: str = ""                 # preference pairs .jsonl (rm.py's formats)
    val_data: str = ""             # held-out pairs; "" splits val_frac off data
    val_frac: float = 0.05         # the fraction of --data held out when there is no --val_data
    out: str = "out/dpo"           # output folder: best/, last/, reference_logprobs.json, metrics.jsonl, config.json
    beta: float = 0.1              # the implicit reward's scale: how far from the reference the policy may move
    lr: float = 1e-6               # peak learning rate (AdamW, no weight decay)
    batch_size: int = 64           # pairs per optimizer step
    micro_batch: int = 4           # pairs per forward/backward (chosen and rejected in one forward: 2x rows)
    epochs: float = 1.0            # passes over the training pairs
    max_length: int = 512          # tokens per prompt + answer; longer pairs are left out
    warmup: float = 0.1            # linear warmup over this fraction of the steps, then cosine decay
    grad_clip: float = 1.0         # clip the gradient's global norm
    eval_every: int = 50           # optimizer steps between held-out evaluations (each saves last/)
    log_every: int = 10            # optimizer steps between metrics lines
    chat_template: bool = False    # texts in the policy folder's chat template instead of the paper's Human/Assistant
    on_error: str = "stop"         # a malformed data line: "stop" or "skip"
    seed: int = 1337               # the held-out split and the order of the pairs
    resume: bool = True            # go on from out/last if it is there
    stop_after: int = 0            # stop (saving out/last) after this many optimizer steps in this run; 0 = to the end


def encode(tok, prompt, response, max_length, chat):
    """A prompt and an answer as the policy sees them -> (ids, response mask): the dialogue's ids (BOS, the paper's
    format or the chat template, the answer, EOS), True on the answer's tokens and the EOS. The prompt's ids must be a
    prefix of the whole (as a sampled answer follows its prompt). None if longer than max_length."""
    head, ids = dialogue_ids(tok, prompt, chat=chat), dialogue_ids(tok, prompt, response, chat=chat)
    if ids[:len(head)] != head:
        raise ValueError(f"the prompt's tokens are not a prefix of the dialogue's: {prompt[-40:]!r}")
    if len(ids) > max_length or len(ids) == len(head):
        return None
    return ids, [False] * len(head) + [True] * (len(ids) - len(head))


def load_data(cfg, tok):
    """The pairs of --data (and --val_data), encoded: [(chosen ids, mask, rejected ids, mask)], train and held out."""
    def encoded(path):
        try:
            out = [(encode(tok, p["prompt"], p["chosen"], cfg.max_length, cfg.chat_template),
                    encode(tok, p.get("rejected_prompt", p["prompt"]), p["rejected"], cfg.max_length,
                           cfg.chat_template))
                   for p in read_pairs(path, cfg.on_error) if p["chosen"].strip() != p["rejected"].strip()]
        except ValueError as e:
            raise UserError(f"{path}: {e}. Leave --chat_template off for this model.") from None
        kept = [(*c, *r) for c, r in out if c is not None and r is not None]
        if len(kept) < len(out) and rank() == 0:
            print(f"note: {path}: {len(out) - len(kept)} pair(s) longer than --max_length={cfg.max_length} left out")
        return kept
    data = encoded(cfg.data)
    if cfg.val_data:
        train_set, val_set = data, encoded(cfg.val_data)
    else:
        order = list(range(len(data)))
        random.Random(cfg.seed).shuffle(order)
        n_val = max(1, int(len(data) * cfg.val_frac))
        train_set, val_set = [data[i] for i in order[n_val:]], [data[i] for i in order[:n_val]]
    if len(train_set) < 1 or len(val_set) < 1:
        raise UserError(f"{cfg.data}: {len(train_set)} training and {len(val_set)} held-out pairs after encoding; DPO "
                        f"needs at least one of each.")
    return train_set, val_set


def batch_tensors(pairs, dev):
    """Micro-batch pairs -> ids (2m, T) right-padded (the chosen answers, then the rejected) and the response mask."""
    seqs = [(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs]
    T = max(len(s) for s, _ in seqs)
    idx = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    rmask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, m) in enumerate(seqs):
        idx[i, :len(s)], rmask[i, :len(m)] = torch.tensor(s), torch.tensor(m)
    return idx.to(dev), rmask.to(dev)


@torch.no_grad()
def reference_logprobs(model, pairs, micro, dev, dtype):
    """1. Each pair's summed response logprobs under the model as it is (the reference), [(chosen, rejected)]: this
    process computes its share (my_micro_batches), the processes' shares are summed into every process's list."""
    index = {id(p): i for i, p in enumerate(pairs)}
    values = [0.0] * (2 * len(pairs))
    model.eval()
    for mb, weight in my_micro_batches(pairs, micro):
        idx, rmask = batch_tensors(mb, dev)
        with autocast(dev, dtype):
            lp = sequence_logprobs(model, idx, rmask).tolist()
        for k, p in enumerate(mb if weight else []):
            values[2 * index[id(p)]], values[2 * index[id(p)] + 1] = lp[k], lp[len(mb) + k]
    model.train()
    values = all_sum(values)
    return [(values[2 * i], values[2 * i + 1]) for i in range(len(pairs))]


def with_reference(cfg, model, train_set, val_set, dev, dtype, key, resuming):
    """The pairs with their reference logprobs appended. A fresh start computes them (reference_logprobs: the model is
    the reference then) and writes out/reference_logprobs.json; a resumed run, whose policy has moved, reads them
    back from there (`key`: the policy, and a hash of the encoded pairs in their order, which the split follows)."""
    path = os.path.join(cfg.out, "reference_logprobs.json")
    pairs = train_set + val_set
    if resuming:
        saved = read_json(path) if os.path.isfile(path) else {}
        if saved.get("run") != key or len(saved.get("logprobs", [])) != len(pairs):   # (other pairs, split or order)
            raise UserError(f"{path} is missing or belongs to another run, and {cfg.out}/last has moved from the "
                            f"reference: start over with --resume=false (or a new --out).")
        ref = [tuple(x) for x in saved["logprobs"]]
    else:
        ref = reference_logprobs(model, pairs, cfg.micro_batch, dev, dtype)
        if rank() == 0:
            write_json(path, {"run": key, "logprobs": [list(x) for x in ref]})
    pairs = [(*p, *r) for p, r in zip(pairs, ref)]
    return pairs[:len(train_set)], pairs[len(train_set):]


# -----------------------------------------------------------------------------
# training

def train_step(model, batch, cfg, dev, dtype, sums):
    """2, 3. The forward and backward passes of one optimizer step over this process's share of `batch`: its pairs'
    DPO loss over the global batch's pair count. Adds [loss, accuracy, margin, chosen reward, rejected reward] x
    pairs and the pair count to `sums`."""
    for mb, weight in my_micro_batches(batch, cfg.micro_batch):
        idx, rmask = batch_tensors(mb, dev)
        with autocast(dev, dtype):
            logp = sequence_logprobs(model, idx, rmask)                        # (2m,): chosen, then rejected
        ref = torch.tensor([p[4:6] for p in mb], device=dev)                   # (m, 2)
        loss, rc, rr = dpo_loss(logp[:len(mb)], logp[len(mb):], ref[:, 0], ref[:, 1], cfg.beta)
        (weight * loss / len(batch)).backward()
        if weight:
            sums = [a + b for a, b in zip(sums, (loss.item(), (rc > rr).sum().item(), (rc - rr).sum().item(),
                                                 rc.sum().item(), rr.sum().item(), len(mb)))]
    return sums


@torch.no_grad()
def evaluate(model, pairs, cfg, dev, dtype):
    """Held-out DPO loss, the implicit reward's accuracy (ties wrong) and mean margin; every process scores every pair
    (FSDP needs them all in every forward)."""
    model.eval()
    sums = [0.0] * 3
    for i in range(0, len(pairs), cfg.micro_batch):
        mb = pairs[i:i + cfg.micro_batch]
        idx, rmask = batch_tensors(mb, dev)
        with autocast(dev, dtype):
            logp = sequence_logprobs(model, idx, rmask)
        ref = torch.tensor([p[4:6] for p in mb], device=dev)
        loss, rc, rr = dpo_loss(logp[:len(mb)], logp[len(mb):], ref[:, 0], ref[:, 1], cfg.beta)
        sums = [a + b for a, b in zip(sums, (loss.item(), (rc > rr).sum().item(), (rc - rr).sum().item()))]
    model.train()
    return {"loss": sums[0] / len(pairs), "accuracy": sums[1] / len(pairs), "margin": sums[2] / len(pairs),
            "n": len(pairs)}


def check_config(cfg):
    for k in ("policy",) if cfg.dry_run else ("policy", "data"):
        if not getattr(cfg, k):
            raise UserError(f"--{k} is required (python dpo.py --policy=SFT_FOLDER --data=PAIRS.jsonl).")
    cfg.policy = model_folder(cfg.policy, "--policy", weights=not cfg.dry_run)
    check_flags(cfg)
    if cfg.beta <= 0:
        raise UserError(f"--beta={cfg.beta}: use a positive scale (0.1 is common).")
    if cfg.batch_size % cfg.micro_batch:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of --micro_batch={cfg.micro_batch}.")


def train(cfg):
    """Train --policy on the pairs of --data. Returns the trainer state."""
    check_config(cfg)
    if cfg.dry_run:   # chosen and rejected of a micro-batch share one forward: 2 x micro_batch rows
        return memory_dry_run(cfg, cfg.policy, "dpo", 2 * cfg.micro_batch, cfg.max_length)
    master_process, world, dev = setup_distributed(cfg.device)
    dtype = compute_dtype(cfg, dev)
    tok = Tokenizer(cfg.policy)
    train_set, val_set = load_data(cfg, tok)
    last, best = os.path.join(cfg.out, "last"), os.path.join(cfg.out, "best")
    weights, adapters, resuming = resume_from(cfg, cfg.policy, last)
    model = Llama.from_pretrained(weights, device=dev, dtype=load_dtype(cfg, dtype))
    params = prepare_for_training(model, cfg, dtype, seed=cfg.seed, trained_from=adapters)
    opt = make_optimizer(model, cfg.lr, weight_decay=0.0)
    total = max(1, int(cfg.epochs * max(1, len(train_set) // cfg.batch_size)))
    run = {"policy": os.path.abspath(cfg.policy), "data": os.path.abspath(cfg.data), "train_pairs": len(train_set),
           "total_steps": total, "lora": lora_key(cfg), "beta": cfg.beta}
    state, log = start_or_resume(cfg, cfg.out, last, {"step": 0, "best_loss": float("inf")}, run,
                                 [(params, opt, last)] if resuming else [])
    key = {"policy": run["policy"], "pairs": hashlib.sha256(json.dumps(train_set + val_set).encode()).hexdigest()}
    train_set, val_set = with_reference(cfg, model, train_set, val_set, dev, dtype, key, resuming)   # 1. reference
    if master_process:
        print(f"dpo: {len(train_set)} training pairs, {len(val_set)} held out; {total} steps of {cfg.batch_size} pairs "
              f"({world} process(es)), beta {cfg.beta}; {dev} {str(dtype).removeprefix('torch.')}; "
              f"{describe(params, model, cfg)}")

    def save(path, files):
        model.save_pretrained(path, shard_bytes(cfg), files={**tok.files(), **files})

    model.train()
    sums, first = [0.0] * 6, state["step"]
    for step in tqdm(range(state["step"], total), initial=state["step"], total=total, desc="dpo",
                     disable=not master_process):
        set_lr(opt, lr_at(step, total, cfg.lr, cfg.warmup))
        batch = epoch_batch(train_set, step, cfg.batch_size, cfg.seed)
        sums = train_step(model, batch, cfg, dev, dtype, sums)
        optimizer_step(params, opt, cfg, cfg.grad_clip, state)
        state["step"] = step + 1
        if state["step"] % cfg.log_every == 0 or state["step"] == total:   # 4. log
            loss, acc, margin, rc, rr, n = all_sum(sums)
            sums = [0.0] * 6
            log({"split": "train", "step": state["step"], "lr": opt.param_groups[0]["lr"], "loss": loss / n,
                 "accuracy": acc / n, "margin": margin / n, "chosen_reward": rc / n, "rejected_reward": rr / n,
                 "skipped_steps": state.get("skipped_steps", 0)})
        stopping = cfg.stop_after and step + 1 - first == cfg.stop_after
        evaluating = state["step"] % cfg.eval_every == 0 or state["step"] == total
        if evaluating:                                                     # 4. held out, best/
            m = evaluate(model, val_set, cfg, dev, dtype)
            log({"split": "val", "step": state["step"], **m})
            if master_process:
                tqdm.write(f"dpo step {state['step']}: held-out loss {m['loss']:.4f}, implicit reward accuracy "
                           f"{m['accuracy']:.3f}, margin {m['margin']:.3f}")
            if from_master(m["loss"]) < state["best_loss"]:   # one decision for every process: the save is a collective
                state["best_loss"] = from_master(m["loss"])
                save(best, {})
        if evaluating or stopping:                                         # 4. last/
            save_training_checkpoint(save, params, opt, last, state, model, final=state["step"] == total)
        if stopping:
            if master_process:
                tqdm.write(f"stopping after {cfg.stop_after} steps (--stop_after); rerun to go on from {last}")
            break
    return state


def main(argv):
    cfg = parse_args(Config, argv)
    if cfg.dry_run:
        return train(cfg)
    with out_lock(cfg.out):        # one run per output folder; --out checked before any model loads
        train(cfg)
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
