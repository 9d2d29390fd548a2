"""
Supervised fine-tuning on dialogues: ALMoST step 2's ALMoST-SFT, trained on the demonstrations that RM-guided
self-play wrote. The loss is on the assistant's final response and the EOS (as the authors' SFT code: the dialogue
before it is the prompt); --loss_on=all puts it on every assistant turn. Never on the user's turns.

    python sft.py --data=out/selfplay_n4.jsonl --model=LLAMA_FOLDER --out=out/sft

Data: jsonl records {"turns": [{"role": "user" | "assistant", "text"}, ...], "usable": true} (almost.py's
selfplay_n{N}.jsonl). The paper's settings are the defaults: AdamW lr 2e-5 without weight decay, warmup 3% then
cosine, 3 epochs of 64 sequences, dialogues of at most 512 tokens. 5% of the dialogues are held out; best/ is the
checkpoint of lowest held-out loss, last/ the latest, and a rerun resumes from last/.
"""
import os
import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import UserError, model_folder, out_lock, parse_args, read_records, run_cli
from model import Llama
from tokenizer import Tokenizer, dialogue_text
from trainer import (ScaleConfig, all_sum, autocast, check_flags, compute_dtype, describe, end_distributed, epoch_batch,
                     from_master, load_dtype, lora_key, lr_at, make_optimizer, memory_dry_run, my_micro_batches,
                     optimizer_step, prepare_for_training, resume_from, save_training_checkpoint, set_lr,
                     setup_distributed, shard_bytes, start_or_resume)


@dataclass
class Config(ScaleConfig):   # device, dtype, LoRA, gradient checkpointing, FSDP: see trainer.py
    data: str = ""                 # dialogues .jsonl (self-play output): {"turns": [{"role", "text"}], "usable"}
    model: str = ""                # the policy to fine-tune (HF LLaMA folder)
    out: str = "out/sft"           # output folder: best/, last/, metrics.jsonl, config.json
    lr: float = 2e-5               # peak learning rate (AdamW, no weight decay)
    batch_size: int = 64           # sequences per optimizer step
    micro_batch: int = 8           # sequences per forward/backward
    epochs: float = 3.0            # passes over the training dialogues
    max_length: int = 512          # tokens per dialogue; longer dialogues are left out
    warmup: float = 0.03           # linear warmup over this fraction of the steps, then cosine decay
    grad_clip: float = 1.0         # clip the gradient's global norm
    eval_every: int = 50           # optimizer steps between held-out evaluations (each saves last/)
    chat_template: bool = False    # dialogues in the model folder's chat template instead of the paper's Human/Assistant
    loss_on: str = "final"         # which assistant turns carry the loss: "final" (the authors') or "all"
    seed: int = 1337               # the held-out split and the order of the dialogues
    resume: bool = True            # go on from out/last if it is there


# -----------------------------------------------------------------------------
# the data and the loss

def encode_dialogue(tok, turns, max_length, chat=False, loss_on="final"):
    """A dialogue [(role, text)] as the policy sees it -> (ids, mask) with mask True exactly on the assistant's tokens
    of its final turn (loss_on="final") or of every turn ("all"): the loss is on what the assistant says. The
    paper's format: BOS + dialogue_text(turns) + EOS (the EOS in the mask); chat=True: the model's chat template (its
    end-of-turn tokens in the mask). Each assistant turn's span comes from rendering the dialogue up to it, and
    tokenizing prefixes of the text (checked to be prefixes of the whole), so it matches prompt-then-generate
    tokenization. None if the dialogue is longer than max_length."""
    def render(k, generation_prompt):   # the text of turns[:k], and the assistant's tag when it is to speak
        if chat:
            return tok.apply_chat_template([{"role": r, "content": t.strip()} for r, t in turns[:k]], generation_prompt)
        return dialogue_text(turns[:k]) + ("\n\nAssistant:" if generation_prompt else "")

    text, spans = render(len(turns), False), []
    for i, (role, _) in enumerate(turns):
        if role == "assistant":
            before, through = render(i, True), render(i + 1, False)
            if not (text.startswith(before) and text.startswith(through)):
                raise ValueError("the chat template does not render a dialogue's beginning as a prefix of the whole")
            spans.append((len(before), len(through)))
    spans = spans[-1:] if loss_on == "final" else spans
    ids = tok.encode(text, bos=not chat) + ([] if chat else [tok.eos_id])
    if len(ids) > max_length:
        return None
    mask = [False] * len(ids)
    for start, end in spans:
        a, b = (len(tok.encode(text[:k], bos=not chat)) for k in (start, end))
        if tok.encode(text[:end], bos=not chat) != ids[:b]:
            raise ValueError(f"tokenization of a turn boundary is not a prefix of the whole: {text[:end][-40:]!r}")
        mask[a:b] = [True] * (b - a)
    if not chat:
        mask[-1] = True                                                        # EOS
    return ids, mask


def sft_loss(model, batch, dev, dtype):
    """The summed cross-entropy of the next token over the masked (assistant) tokens of a list of (ids, mask), and
    the count of those tokens. Rows are right-padded; the mask of a row is shifted by one (position t predicts t+1)."""
    T = max(len(i) for i, _ in batch)
    idx = torch.zeros(len(batch), T, dtype=torch.long)
    tgt = torch.full((len(batch), T), -100, dtype=torch.long)       # right padding; -100 = no loss
    for r, (ids, m) in enumerate(batch):
        idx[r, :len(ids)] = torch.tensor(ids)
        tgt[r, :len(ids) - 1] = torch.tensor([t if mm else -100 for t, mm in zip(ids[1:], m[1:])])
    # no attention mask: a row's padding all comes after its tokens, where causal attention never looks, and the
    # positions count from 0 as they would alone; so the GPU runs its causal kernel (flash attention), not a masked one
    with autocast(dev, dtype):
        logits = model(idx.to(dev))                                        # (B, T, V) fp32
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.to(dev).flatten(), reduction="sum",
                                             ignore_index=-100)
    return loss, int((tgt != -100).sum())


def load_data(cfg, tok):
    """The usable dialogues of --data, encoded; 5% held out (a split seeded by --seed)."""
    records = [r for r in read_records(cfg.data) if r.get("usable")]
    if len(records) < 2:
        raise UserError(f"{cfg.data}: {len(records)} usable dialogue(s); SFT needs at least 2. Run selfplay first.")
    try:
        data = [encode_dialogue(tok, [(t["role"], t["text"]) for t in r["turns"]], cfg.max_length, cfg.chat_template,
                                cfg.loss_on) for r in records]
    except ValueError as e:
        raise UserError(f"{cfg.data}: {e}. Leave --chat_template off for this model.") from None
    dropped = sum(d is None for d in data)
    data = [d for d in data if d is not None]
    if dropped:
        print(f"note: {cfg.data}: {dropped} dialogue(s) longer than max_length={cfg.max_length} left out")
    order = list(range(len(data)))
    random.Random(cfg.seed).shuffle(order)
    n_val = max(1, len(data) // 20)
    return [data[i] for i in order[n_val:]], [data[i] for i in order[:n_val]]


# -----------------------------------------------------------------------------
# training

def train(cfg):
    """Fine-tune --model on --data. Returns (trainer state, the trained model)."""
    for k in ("model",) if cfg.dry_run else ("data", "model"):
        if not getattr(cfg, k):
            raise UserError(f"--{k} is required (python sft.py --data=DIALOGUES.jsonl --model=LLAMA_FOLDER).")
    if cfg.loss_on not in ("final", "all"):
        raise UserError(f"--loss_on={cfg.loss_on!r}: use final or all.")
    check_flags(cfg)
    cfg.model = model_folder(cfg.model, "--model", weights=not cfg.dry_run)
    if cfg.dry_run:
        return memory_dry_run(cfg, cfg.model, "sft", cfg.micro_batch, cfg.max_length)
    if not os.path.isfile(cfg.data):
        raise UserError(f"{cfg.data}: no such dialogues file. Run almost.py's selfplay stage, or give a .jsonl of "
                        f"{{\"turns\": [...], \"usable\": true}} records.")
    tok = Tokenizer(cfg.model)
    train_set, val_set = load_data(cfg, tok)
    master_process, world, dev = setup_distributed(cfg.device)
    dtype = compute_dtype(cfg, dev)
    last, best = os.path.join(cfg.out, "last"), os.path.join(cfg.out, "best")
    weights, adapters, resuming = resume_from(cfg, cfg.model, last)
    model = Llama.from_pretrained(weights, device=dev, dtype=load_dtype(cfg, dtype))
    params = prepare_for_training(model, cfg, dtype, seed=cfg.seed, trained_from=adapters)
    opt = make_optimizer(model, cfg.lr, weight_decay=0.0)                     # the paper: no weight decay
    total = max(1, int(cfg.epochs * max(1, len(train_set) // cfg.batch_size)))
    run = {"data": os.path.abspath(cfg.data), "train_dialogues": len(train_set), "total_steps": total,
           "lora": lora_key(cfg)}
    state, log = start_or_resume(cfg, cfg.out, last, {"step": 0, "best_loss": float("inf")}, run,
                                 [(params, opt, last)] if resuming else [])
    name = os.path.basename(os.path.normpath(cfg.out))
    if master_process:
        print(f"sft {name}: {len(train_set)} dialogues, {total} steps of {cfg.batch_size}; "
              f"{dev} {str(dtype).removeprefix('torch.')}; {describe(params, model, cfg)}")

    def save(path, files):
        model.save_pretrained(path, shard_bytes(cfg), files={**tok.files(), **files})

    model.train()
    for step in tqdm(range(state["step"], total), initial=state["step"], total=total, desc=f"sft {name}",
                     disable=not master_process):
        batch = epoch_batch(train_set, step, cfg.batch_size, cfg.seed)
        n_tok = sum(sum(m[1:]) for _, m in batch)                              # of the global batch
        set_lr(opt, lr_at(step, total, cfg.lr, cfg.warmup))
        total_loss = 0.0
        for mb, weight in my_micro_batches(batch, cfg.micro_batch):           # this process's share
            loss, _ = sft_loss(model, mb, dev, dtype)
            (weight * loss / max(n_tok, 1)).backward()
            total_loss += weight * loss.item()
        optimizer_step(params, opt, cfg, cfg.grad_clip, state)
        state["step"] = step + 1
        total_loss, = all_sum([total_loss])
        log({"split": "train", "step": state["step"], "loss": total_loss / max(n_tok, 1),
             "lr": opt.param_groups[0]["lr"], "skipped_steps": state.get("skipped_steps", 0)})
        if state["step"] % cfg.eval_every == 0 or state["step"] == total:
            model.eval()
            with torch.no_grad():   # every process, the whole held-out set (FSDP needs them all)
                parts = [sft_loss(model, val_set[i:i + cfg.micro_batch], dev, dtype)
                         for i in range(0, len(val_set), cfg.micro_batch)]
            model.train()
            val_loss = from_master(sum(l.item() for l, _ in parts) / max(1, sum(c for _, c in parts)))
            log({"split": "val", "step": state["step"], "loss": val_loss})
            if master_process:
                tqdm.write(f"sft step {state['step']}: held-out loss {val_loss:.4f}")
            if val_loss < state["best_loss"]:
                state["best_loss"] = val_loss
                save(best, {})
            save_training_checkpoint(save, params, opt, last, state, model, final=state["step"] == total)
    return state, model


def main(argv):
    cfg = parse_args(Config, argv)
    if cfg.dry_run:
        return train(cfg)
    with out_lock(cfg.out):        # one run per output folder; --out checked before any model loads
        train(cfg)
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
