"""
The Bradley-Terry reward model of ALMoST step 1d: a LLaMA-family trunk and a Linear(hidden, 1) head that scores the last
real token (the appended EOS) of "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}</s>", and its trainer.

    python rm.py                                                          # the bundled synthetic pairs, ~1 min
    python rm.py --data=PAIRS.jsonl --model=LLAMA_FOLDER --out=out/rm     # train (paper defaults)
    python rm.py --data=PAIRS.jsonl --preset=tiny                         # the bundled 260K model, minutes on CPU
    python eval.py --rm=out/rm/last                                       # static HHH + Anthropic HH test splits

Checkpoints are transformers' LlamaForSequenceClassification (Qwen2's or Mistral's for those trunks; num_labels=1,
head "score.weight"), so
`transformers` gives the same scores. Data: jsonl lines {"prompt", "chosen", "rejected"} (TRL's pair format), or
Anthropic HH lines where `chosen` / `rejected` hold the whole dialogue.
"""
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError, model_folder, out_lock, parse_args, run_cli, user_set
from lora import reshard
from model import FAMILIES, Llama, last_token_index, load_config, load_tokenizer, pad_batch, tensor_names
from readers import read_pairs
from tokenizer import dialogue_ids
from trainer import (ScaleConfig, all_sum, autocast, check_flags, compute_dtype, describe, end_distributed, epoch_batch,
                     from_master, load_dtype, lora_key, lr_at, make_optimizer, memory_dry_run, my_micro_batches,
                     optimizer_step, prepare_for_training, resume_from, save_training_checkpoint, set_lr,
                     setup_distributed, shard_bytes, start_or_resume)

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# the texts the reward model reads

def encode(tok, prompt, response, max_length, chat=False):
    """Token ids of the dialogue ending in `response`, then EOS: the paper's format without BOS (as the released
    code), or the model's chat template (chat=True). Left-truncated to max_length so the response's end and the EOS
    survive."""
    return dialogue_ids(tok, prompt, response, chat, bos=False)[-max_length:]


# -----------------------------------------------------------------------------
# the reward model

class RewardModel(nn.Module):
    def __init__(self, trunk, tok, max_length=1024, chat=False):
        super().__init__()
        # chat: texts in the model's chat template instead of the paper's format (saved with the model)
        max_length = min(max_length, trunk.config.context)    # never past the context window
        self.model, self.tok, self.max_length, self.chat = trunk, tok, max_length, chat
        C = trunk.config.hidden_size
        p = trunk.embed_tokens.weight
        # the head, fp32 whatever the trunk's dtype; saved under HF's name "score.weight" (score() is the method)
        self.head = nn.Linear(C, 1, bias=False, device=p.device, dtype=torch.float32)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(C + 1))
        self.normalizer = {"mean": 0.0, "std": 1.0}   # of raw scores on a reference set; see normalize()

    @staticmethod
    def check(path, flag="--rm"):
        """A folder used as a reward model (PPO's reward and value start, the evaluation, self-play) must hold a
        trained scalar head, score.weight (HF's ...ForSequenceClassification layout); a causal LM would get a fresh,
        random head and its scores would be noise. One message names the folder and what it holds."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{flag}={path}: not a model folder (no config.json). Give a reward model that rm.py "
                            f"trained (its out/rm/last).")
        if "score.weight" not in tensor_names(path):
            arch = ", ".join(load_config(path).extra.get("architectures") or []) or "no scalar head"
            raise UserError(f"{flag}={path}: not a reward model: it holds {arch} and no trained head (score.weight). "
                            f"Train one first, python rm.py --model={path} --data=PAIRS.jsonl, and pass its "
                            f"out/rm/last.")
        return path

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, max_length=1024, seed=0):
        """A saved reward model (its head and normaliser), or any LLaMA-family folder (trunk only, fresh head)."""
        C = load_config(path).hidden_size
        trunk = Llama.from_pretrained(path, device=device, dtype=dtype, lm_head=False,
                                      extra={"score.weight": (1, C)})
        tok = load_tokenizer(path, trunk.config)
        torch.manual_seed(seed)
        head = trunk.extra_tensors.pop("score.weight", None)
        chat = False
        if head is not None:   # a saved reward model: its own max_length, text format and normaliser
            max_length = trunk.config.extra.get("max_length", max_length)
            chat = bool(trunk.config.extra.get("chat_template", False))
        reward_model = cls(trunk, tok, max_length, chat)
        if head is not None:
            reward_model.head.weight = nn.Parameter(head)
            reward_model.normalizer = trunk.config.extra.get("reward_normalizer", reward_model.normalizer)
        return reward_model.eval()

    def save_pretrained(self, path, files=None, max_shard_bytes=5 * 10**9):
        """...ForSequenceClassification layout (Llama, Qwen2 or Mistral, as the trunk). transformers scores the last
        token that is not pad_token_id,
        so pad is set to a token the texts never end with (not EOS): that is the token we score."""
        pad = 0 if self.tok.eos_id != 0 else 1
        files = {**self.tok.files(pad_id=pad), **(files or {})}
        reshard(self)   # (FSDP: the head's root module)
        arch = FAMILIES[self.model.config.model_type] + "ForSequenceClassification"
        self.model.save_pretrained(path, max_shard_bytes, extra={"score.weight": self.head.weight}, files=files,
                                   config_updates={
            "architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
            "pad_token_id": pad, "reward_normalizer": self.normalizer, "max_length": self.max_length,
            "chat_template": self.chat})

    def forward(self, idx, mask, per_token=False):
        """(B, T) ids and mask -> (B,) fp32 raw scores, read at each row's last real token; per_token=True: the
        head on every position (B, T) (PPO's value model)."""
        _, h = self.model(idx, mask=mask, return_hidden=True, logits="none")    # (B, T, C)
        if not per_token:
            h = h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)]  # (B, C)
        # the head in fp32 on fp32 states whatever the autocast: a bf16 score is +-0.016 at 8, where PPO's per-token
        # KL rewards are ~1e-3 and close pairs would round to ties
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts, responses, batch_size=32, normalize=False):
        """Scores (N,) of N (prompt, response) texts, batched with left padding (longest first, so batches are
        tight; the result is in the input order). normalize: (r - mean) / std with the stored normaliser."""
        return self.score_ids([encode(self.tok, p, r, self.max_length, self.chat) for p, r in zip(prompts, responses)],
                              batch_size, normalize)

    @torch.no_grad()
    def score_ids(self, seqs, batch_size=32, normalize=False):
        dev = self.head.weight.device
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = torch.empty(len(seqs))
        was_training = self.training
        self.eval()
        for b in tqdm(range(0, len(seqs), batch_size), desc="scoring", leave=False, disable=len(seqs) <= 512):
            ids = order[b:b + batch_size]
            idx, mask = pad_batch([seqs[i] for i in ids], device=dev)
            out[ids] = self(idx, mask).cpu()
        self.train(was_training)
        if normalize:
            out = (out - self.normalizer["mean"]) / self.normalizer["std"]
        return out

    def fit_normalizer(self, seqs, batch_size=32):
        s = self.score_ids(seqs, batch_size)
        self.normalizer = {"mean": s.mean().item(), "std": max(s.std().item(), 1e-6), "n": len(seqs)}


# -----------------------------------------------------------------------------
# the Bradley-Terry loss and the metrics of a set of pairs

def bt_loss(r_chosen, r_rejected, reduction="mean"):
    """The Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) of each pair, in the stable softplus form;
    averaged (or summed, reduction="sum")."""
    losses = F.softplus(r_rejected - r_chosen)
    return losses.sum() if reduction == "sum" else losses.mean()


def pair_metrics(r_chosen, r_rejected):
    """Accuracy counts ties as wrong (r_c must be strictly greater)."""
    r = torch.cat([r_chosen, r_rejected])
    return {"loss": bt_loss(r_chosen, r_rejected).item(), "accuracy": (r_chosen > r_rejected).float().mean().item(),
            "margin": (r_chosen - r_rejected).mean().item(), "score_mean": r.mean().item(),
            "score_std": r.std().item() if len(r) > 1 else 0.0, "n": len(r_chosen)}


def pearson(x, y):
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    d = (x.norm() * y.norm()).item()
    return (x @ y).item() / d if d > 0 else float("nan")


def tokenize_pairs(reward_model, pairs, where):
    """-> list of (chosen_ids, rejected_ids, pair) in the reward model's format; drops pairs whose two texts are
    identical (they teach nothing and would count as ties) and reports truncation."""
    tok, max_length, chat = reward_model.tok, reward_model.max_length, reward_model.chat
    out, same, cut = [], 0, 0
    for p in pairs:
        c = encode(tok, p["prompt"], p["chosen"], max_length, chat)
        r = encode(tok, p.get("rejected_prompt", p["prompt"]), p["rejected"], max_length, chat)
        if c == r:
            same += 1
            continue
        for prompt, resp in ((p["prompt"], p["chosen"]), (p.get("rejected_prompt", p["prompt"]), p["rejected"])):
            cut += len(dialogue_ids(tok, prompt, resp, chat, bos=False)) > max_length
        out.append((c, r, p))
    if same:
        print(f"note: {where}: dropped {same} pair(s) whose chosen and rejected texts are identical", file=sys.stderr)
    if cut:
        print(f"note: {where}: {cut} text(s) longer than max_length={max_length} were left-truncated "
              f"(the response's end and EOS kept)", file=sys.stderr)
    if not out:
        raise UserError(f"{where}: no pair left to use (all {len(pairs)} have identical chosen and rejected texts).")
    return out


@torch.no_grad()
def evaluate_pairs(reward_model, data, batch_size=32):
    """data: list of (chosen_ids, rejected_ids, pair). Metrics, plus the score-length correlation (characters
    of the response) and per-"type" accuracy when pairs carry a type (the static HHH set)."""
    rc = reward_model.score_ids([d[0] for d in data], batch_size)
    rr = reward_model.score_ids([d[1] for d in data], batch_size)
    m = pair_metrics(rc, rr)
    lengths = torch.tensor([len(d[2]["chosen"]) for d in data] + [len(d[2]["rejected"]) for d in data])
    m["length_corr"] = pearson(torch.cat([rc, rr]), lengths.float())
    types = sorted({d[2]["type"] for d in data if "type" in d[2]})
    for t in types:
        sel = torch.tensor([d[2].get("type") == t for d in data])
        m[f"accuracy_{t}"] = (rc[sel] > rr[sel]).float().mean().item()
    return m


# -----------------------------------------------------------------------------
# training (the paper's step 1d: AdamW lr 2e-5, weight decay 0.1, warmup 3% then cosine, one epoch of 128-pair steps)

@dataclass
class TrainConfig(ScaleConfig):
    data: str = ""                 # pairs .jsonl (required)
    val_data: str = ""             # held-out pairs; "" splits val_frac off data
    val_frac: float = 0.05         # the fraction of --data held out when there is no --val_data
    model: str = ""                # LLaMA folder (the pretrained base, not SFT) or a reward model to go on from
    out: str = "out/rm"            # output folder: best/, last/, metrics.jsonl, config.json
    preset: str = ""               # "tiny": settings for the bundled 260K model on CPU (see README)
    max_length: int = 1024         # tokens per text; longer ones lose their start
    chat_template: bool = False    # texts in the model folder's chat template instead of the paper's Human/Assistant
    batch_size: int = 128          # pairs per optimizer step (paper: 128)
    micro_batch: int = 8           # pairs per forward/backward; batch_size / micro_batch accumulation steps
    epochs: float = 1.0            # passes over the training pairs
    lr: float = 2e-5               # peak learning rate (AdamW)
    weight_decay: float = 0.1      # AdamW weight decay, on matrices only
    beta2: float = 0.999           # AdamW's second-moment decay (the authors': transformers' default, 0.999)
    warmup: float = 0.03           # linear warmup over this fraction of the steps, then cosine decay
    grad_clip: float = 1.0         # clip the gradient's global norm
    eval_every: int = 50           # optimizer steps between held-out evaluations (each saves last/)
    log_every: int = 10            # optimizer steps between metrics lines
    seed: int = 1337               # the data split, the order of the pairs, the head's initialisation
    on_error: str = "stop"         # a malformed data line: "stop" or "skip"
    resume: bool = True            # go on from out/last if it is there
    stop_after: int = 0            # stop (saving out/last) after this many optimizer steps in this run; 0 = run to the end


PRESETS = {"tiny": dict(model=os.path.join(HERE, "data", "stories260K"), max_length=512, batch_size=32,
                        micro_batch=16, lr=1e-3, weight_decay=0.0, epochs=3.0, eval_every=25, log_every=5),
           # a ~135M chat model on CPU (almost.py --profile=chat): short texts, small batches, one pass
           "chat": dict(max_length=320, batch_size=16, micro_batch=4, lr=2e-5, epochs=1.0, eval_every=5,
                        log_every=2)}
EVAL_FILES = ("hhh_eval.json", "test.jsonl.gz", "mc_task.json", "task.json", "question.jsonl")


def check_config(cfg):
    """Apply --preset (flags given on the command line win) and refuse what cannot run, before anything loads."""
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise UserError(f"--preset={cfg.preset!r}: known presets are {', '.join(PRESETS)}.")
        for k, v in PRESETS[cfg.preset].items():
            if not user_set(cfg, k):   # flags given on the command line win, whatever their value
                setattr(cfg, k, v)
    if not cfg.model:
        raise UserError("--model is required: a LLaMA-family folder (the base model) or --preset=tiny.")
    check_flags(cfg)
    cfg.model = model_folder(cfg.model, "--model", weights=not cfg.dry_run)
    if cfg.dry_run:
        return
    if not cfg.data:
        raise UserError("--data is required: a .jsonl file of {\"prompt\", \"chosen\", \"rejected\"} lines.")
    for f in (cfg.data, cfg.val_data):
        if f and os.path.basename(f) in EVAL_FILES:
            raise UserError(f"{f}: this is an evaluation set (it carries a canary); never train on it.")
    if cfg.on_error not in ("stop", "skip"):
        raise UserError("--on_error must be 'stop' or 'skip'.")
    if cfg.batch_size % cfg.micro_batch:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of --micro_batch={cfg.micro_batch}.")


def load_data(cfg, reward_model):
    """The training and held-out pairs, tokenized once: --val_data, or a split of --data seeded by --seed."""
    pairs = read_pairs(cfg.data, cfg.on_error)
    if cfg.val_data:
        train_pairs, val_pairs = pairs, read_pairs(cfg.val_data, cfg.on_error)
    else:
        idx = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(idx)
        n_val = max(1, int(round(cfg.val_frac * len(pairs)))) if len(pairs) > 1 else 0
        if n_val == 0:
            raise UserError(f"{cfg.data}: one pair cannot be split into train and held-out; add pairs or "
                            f"give --val_data.")
        val_pairs, train_pairs = [pairs[i] for i in idx[:n_val]], [pairs[i] for i in idx[n_val:]]
    train_set = tokenize_pairs(reward_model, train_pairs, cfg.data)
    val_set = tokenize_pairs(reward_model, val_pairs, cfg.val_data or cfg.data + " (held out)")
    if len(train_set) < cfg.batch_size:
        print(f"note: {len(train_set)} training pairs < --batch_size={cfg.batch_size}: one step per epoch uses "
              f"them all", file=sys.stderr)
    return train_set, val_set


def train_step(reward_model, batch, cfg, dev, dtype, sums):
    """The forward and backward passes of one optimizer step over this process's share of `batch`, whose loss is its
    share of the Bradley-Terry loss averaged over the global batch. Adds [loss, accuracy, margin] x pairs and the
    pair count to `sums`."""
    for mb, weight in my_micro_batches(batch, cfg.micro_batch):
        # chosen and rejected of a micro-batch go through one forward (2m rows, left padded)
        idx, mask = pad_batch([c for c, _, _ in mb] + [r for _, r, _ in mb], device=dev)
        with autocast(dev, dtype):
            r = reward_model(idx, mask)                                        # (2m,)
        r_chosen, r_rejected = r[:len(mb)], r[len(mb):]
        (weight * bt_loss(r_chosen, r_rejected, reduction="sum") / len(batch)).backward()
        if weight:
            m = pair_metrics(r_chosen.detach(), r_rejected.detach())
            sums = [a + b for a, b in zip(sums, (m["loss"] * m["n"], m["accuracy"] * m["n"], m["margin"] * m["n"],
                                                 m["n"]))]
    return sums


def validate(reward_model, val_set, cfg, dev, dtype, state, log, master_process):
    """Held-out accuracy (every process scores the whole set: FSDP needs them all) and the score normaliser; saves
    best/ when the accuracy improved. Returns the metrics."""
    with autocast(dev, dtype):
        m = evaluate_pairs(reward_model, val_set, batch_size=2 * cfg.micro_batch)
        # normaliser on the held-out responses, so a KL coefficient means the same across runs
        reward_model.fit_normalizer([d[0] for d in val_set] + [d[1] for d in val_set], 2 * cfg.micro_batch)
    reward_model.train()
    log({"split": "val", "step": state["step"], **m})
    if master_process:
        tqdm.write(f"step {state['step']}: held-out accuracy {m['accuracy']:.4f} loss {m['loss']:.4f} "
                   f"margin {m['margin']:.3f} length corr {m['length_corr']:.3f}")
    m["accuracy"] = from_master(m["accuracy"])   # one decision for every process: the save is a collective
    if m["accuracy"] > state["best_accuracy"]:
        state["best_accuracy"] = m["accuracy"]
        reward_model.save_pretrained(os.path.join(cfg.out, "best"), max_shard_bytes=shard_bytes(cfg))
    return m


def train(cfg):
    check_config(cfg)
    if cfg.dry_run:   # chosen and rejected of a micro-batch share one forward: 2 x micro_batch rows
        return memory_dry_run(cfg, cfg.model, "rm", 2 * cfg.micro_batch, cfg.max_length)
    master_process, world, dev = setup_distributed(cfg.device)
    if cfg.batch_size % world:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of the {world} processes.")
    dtype = compute_dtype(cfg, dev)
    last = os.path.join(cfg.out, "last")
    weights, adapters, resuming = resume_from(cfg, cfg.model, last)
    reward_model = RewardModel.from_pretrained(weights, device=dev, dtype=load_dtype(cfg, dtype),
                                               max_length=cfg.max_length, seed=cfg.seed)
    reward_model.chat = cfg.chat_template
    if adapters:
        reward_model.normalizer = load_config(last).extra.get("reward_normalizer", reward_model.normalizer)
    params = prepare_for_training(reward_model, cfg, dtype, heads=[reward_model.head], seed=cfg.seed,
                                  trained_from=adapters)
    train_set, val_set = load_data(cfg, reward_model)
    total = max(1, int(cfg.epochs * max(1, len(train_set) // cfg.batch_size)))
    opt = make_optimizer(reward_model, cfg.lr, cfg.weight_decay, betas=(0.9, cfg.beta2))
    run = {"data": os.path.abspath(cfg.data), "train_pairs": len(train_set), "total_steps": total,
           "lora": lora_key(cfg)}
    state, log = start_or_resume(cfg, cfg.out, last, {"step": 0, "best_accuracy": -1.0}, run,
                                 [(params, opt, last)] if resuming else [])
    if master_process:
        print(f"{len(train_set)} training pairs, {len(val_set)} held out; {total} steps of {cfg.batch_size} pairs "
              f"({world} process(es), micro-batches of {cfg.micro_batch}); lr {cfg.lr}; "
              f"{dev} {str(dtype).removeprefix('torch.')}; {describe(params, reward_model, cfg)}")

    reward_model.train()
    bar = tqdm(initial=state["step"], total=total, desc="rm", dynamic_ncols=True, disable=not master_process)
    t0, pairs_done, sums, first = time.time(), 0, [0.0] * 4, state["step"]
    for step in range(state["step"], total):
        set_lr(opt, lr_at(step, total, cfg.lr, cfg.warmup))
        batch = epoch_batch(train_set, step, cfg.batch_size, cfg.seed)
        sums = train_step(reward_model, batch, cfg, dev, dtype, sums)
        grad_norm = optimizer_step(params, opt, cfg, cfg.grad_clip, state)
        pairs_done += len(batch)
        state["step"] = step + 1
        bar.update(1)
        if state["step"] % cfg.log_every == 0 or state["step"] == total:
            loss_sum, acc_sum, margin_sum, n = all_sum(sums)
            sums = [0.0] * 4
            log({"split": "train", "step": state["step"], "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                 "pairs_per_s": pairs_done / (time.time() - t0), "loss": loss_sum / n, "accuracy": acc_sum / n,
                 "margin": margin_sum / n, "skipped_steps": state.get("skipped_steps", 0)})
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{acc_sum / n:.3f}")
        stopping = cfg.stop_after and step + 1 - first == cfg.stop_after
        evaluating = state["step"] % cfg.eval_every == 0 or state["step"] == total
        if evaluating:
            validate(reward_model, val_set, cfg, dev, dtype, state, log, master_process)
        if evaluating or stopping:
            save = lambda p, files: reward_model.save_pretrained(p, files, shard_bytes(cfg))   # noqa: E731
            save_training_checkpoint(save, params, opt, last, state, reward_model,
                                     final=state["step"] == total)
        if stopping:
            if master_process:
                tqdm.write(f"stopping after {cfg.stop_after} steps (--stop_after); rerun to go on from {last}")
            break
    bar.close()
    if state["step"] == total and master_process:
        print(f"done: the reward model is {last} (the last checkpoint, as the authors keep); the best held-out "
              f"accuracy, {state['best_accuracy']:.4f}, is in {os.path.join(cfg.out, 'best')}")
    return state


BUNDLED_PAIRS = os.path.join(HERE, "data", "stories", "comparisons.jsonl")


def main(argv):
    cfg = parse_args(TrainConfig, argv)
    if not cfg.data and not cfg.model and not cfg.preset:
        # no arguments: the synthetic comparisons the bundled story profile made (almost.py), tiny preset, in a
        # folder of its own (out/rm is the pipeline's)
        cfg.data, cfg.preset = BUNDLED_PAIRS, "tiny"
        if cfg.out == TrainConfig().out:
            cfg.out = "out/rm_bundled"
        print(f"no --data/--model: training on the bundled synthetic comparisons {cfg.data} with --preset=tiny")
    if cfg.dry_run:
        return train(cfg)
    with out_lock(cfg.out):        # one run per output folder; --out checked before any model loads
        state = train(cfg)
    end_distributed()
    return state


if __name__ == "__main__":
    run_cli(main)
