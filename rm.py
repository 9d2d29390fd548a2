"""
The Bradley-Terry reward model of ALMoST step 1d: a LLaMA trunk and a Linear(hidden, 1) head that scores the last
real token (the appended EOS) of "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}</s>".

    python rm.py                                                          # the bundled synthetic pairs, ~1 min
    python rm.py --data=PAIRS.jsonl --model=LLAMA_FOLDER --out=out/rm     # train (paper defaults)
    python rm.py --data=PAIRS.jsonl --preset=tiny                         # the bundled 260K model, minutes on CPU
    python rm.py eval --rm=out/rm/best                                    # static HHH + Anthropic HH test splits
    python rm.py eval --rm=out/rm/best --data=PAIRS.jsonl

Checkpoints are transformers' LlamaForSequenceClassification (num_labels=1, head "score.weight"), so
`transformers` gives the same scores. Data: jsonl lines {"prompt", "chosen", "rejected"} (TRL's pair format), or
Anthropic HH lines where `chosen` / `rejected` hold the whole dialogue.
"""
import gzip
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model import (LORA_TARGETS, Block, Llama, Tokenizer, UserError, add_lora, default_dtype, full_tensor,
                   last_token_index, load_config, rank, reshard, write_json)
from sample import DTYPES, PAD_ID, parse_args, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# text format and data (ALMOST.md, step 1d)

def format_dialogue(prompt, response=None):
    """THE prompt format. A plain query becomes "\\n\\nHuman: {query}"; a prompt that already is a dialogue
    ("\\n\\nHuman: ... \\n\\nAssistant: ... \\n\\nHuman: ...") is kept. Then "\\n\\nAssistant:" and, if given,
    " {response}". Without a response this is the text a policy continues."""
    p = prompt if prompt.lstrip(" ").startswith("\n\nHuman:") else "\n\nHuman: " + prompt.strip()
    p = p.rstrip()
    return p + "\n\nAssistant:" + ("" if response is None else " " + response.strip())


def dialogue_text(turns):
    """[(role, text), ...] with roles "user" / "assistant" -> "\n\nHuman: ...\n\nAssistant: ..." in the same
    format as format_dialogue (which takes this text as its prompt for the next answer)."""
    return "".join(("\n\nHuman: " if role == "user" else "\n\nAssistant: ") + text.strip() for role, text in turns)


def split_dialogue(text):
    """An Anthropic HH dialogue -> (prompt, response), split at the last "\\n\\nAssistant:"."""
    i = text.rfind("\n\nAssistant:")
    if i < 0:
        return None
    return text[:i], text[i + len("\n\nAssistant:"):].strip()


def read_pairs(path, on_error="stop"):
    """Preference pairs from a .jsonl / .jsonl.gz (one object a line) or .json (a list) file, as dicts
    {"prompt", "chosen", "rejected"} plus any other fields (e.g. "type"). on_error: "stop" at the first bad line
    with its file:line, or "skip" it with a warning."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file. Give a .jsonl file of {{\"prompt\", \"chosen\", \"rejected\"}} "
                        f"lines.")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                items = list(enumerate(json.load(f), 1))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e}). A .json file must hold a list of pairs; use "
                                f".jsonl for one pair a line.") from None
        else:
            items = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    pairs, skipped = [], 0
    for lineno, item in items:
        try:
            d = json.loads(item) if isinstance(item, str) else item
            if not isinstance(d, dict) or not isinstance(d.get("chosen"), str) or not isinstance(d.get("rejected"), str):
                raise ValueError('needs string fields "chosen" and "rejected"')
            if "prompt" not in d:  # HH layout: the dialogue is in chosen / rejected
                c, r = split_dialogue(d["chosen"]), split_dialogue(d["rejected"])
                if c is None or r is None:
                    raise ValueError('has no "prompt" and no "\\n\\nAssistant:" turn to split the dialogue at')
                d = {**d, "prompt": c[0], "chosen": c[1], "rejected": r[1], "rejected_prompt": r[0]}
            elif not isinstance(d["prompt"], str):
                raise ValueError('"prompt" must be a string')
            pairs.append(d)
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


def encode(tok, prompt, response, max_length):
    """Token ids of format_dialogue(prompt, response) + EOS, no BOS (as the released code), left-truncated to
    max_length so the response's end and the EOS survive."""
    ids = tok.encode(format_dialogue(prompt, response), bos=False)
    return ids[-(max_length - 1):] + [tok.eos_id]


def pad_batch(seqs, left=True, device="cpu"):
    """list of id lists -> (B, T) ids and (B, T) bool mask, padded on the left (or right)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        idx[i, sl] = torch.tensor(s)
        mask[i, sl] = True
    return idx.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# the reward model

class RewardModel(nn.Module):
    def __init__(self, trunk, tok, max_length=1024):
        super().__init__()
        self.model, self.tok, self.max_length = trunk, tok, max_length
        C = trunk.config.hidden_size
        p = trunk.embed_tokens.weight
        # the head; saved under HF's name "score.weight" (our score() is the scoring method)
        self.head = nn.Linear(C, 1, bias=False, device=p.device, dtype=p.dtype)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(C + 1))
        self.normalizer = {"mean": 0.0, "std": 1.0}   # of raw scores on a reference set; see normalize()

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, max_length=1024, seed=0):
        """A saved reward model (its head and normaliser), or any LLaMA folder (trunk only, fresh head)."""
        C = load_config(path).hidden_size
        trunk = Llama.from_pretrained(path, device=device, dtype=dtype, lm_head=False,
                                      extra={"score.weight": (1, C)})
        tok = Tokenizer(path)
        if tok.vocab_size > trunk.config.vocab_size:
            raise UserError(f"{tok.path}: {tok.vocab_size} pieces but the model's vocab_size is "
                            f"{trunk.config.vocab_size}. Use the tokenizer.model of this checkpoint.")
        torch.manual_seed(seed)
        head = trunk.extra_tensors.pop("score.weight", None)
        if head is not None:   # a saved reward model: its own max_length and normaliser
            max_length = trunk.config.extra.get("max_length", max_length)
        rm = cls(trunk, tok, max_length)
        if head is not None:
            rm.head.weight = nn.Parameter(head)
            rm.normalizer = trunk.config.extra.get("reward_normalizer", rm.normalizer)
        return rm.eval()

    def save_pretrained(self, path, files=None):
        """LlamaForSequenceClassification layout. transformers scores the last token that is not pad_token_id,
        so pad is set to a token the texts never end with (not EOS): that is the token we score."""
        pad = 0 if self.tok.eos_id != 0 else 1
        files = {"tokenizer.model": self.tok.save, **(files or {})}
        reshard(self)   # (FSDP: the head's root module)
        self.model.save_pretrained(path, extra={"score.weight": self.head.weight}, files=files, config_updates={
            "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
            "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad,
            "reward_normalizer": self.normalizer, "max_length": self.max_length})

    def forward(self, idx, mask, per_token=False):
        """(B, T) ids and mask -> (B,) fp32 raw scores, read at each row's last real token; per_token=True: the
        head on every position (B, T) (PPO's value model)."""
        _, h = self.model(idx, mask=mask, return_hidden=True, logits="none")    # (B, T, C)
        if not per_token:
            h = h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)]  # (B, C)
        return self.head(h).squeeze(-1).float()

    @torch.no_grad()
    def score(self, prompts, responses, batch_size=32, normalize=False):
        """Scores (N,) of N (prompt, response) texts, batched with left padding (longest first, so batches are
        tight; the result is in the input order). normalize: (r - mean) / std with the stored normaliser."""
        return self.score_ids([encode(self.tok, p, r, self.max_length) for p, r in zip(prompts, responses)],
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
# loss and metrics (Bradley-Terry)

def bt_loss(r_chosen, r_rejected):
    """-log sigmoid(r_c - r_r), averaged; softplus form for stability."""
    return F.softplus(r_rejected - r_chosen).mean()


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


def tokenize_pairs(tok, pairs, max_length, where):
    """-> list of (chosen_ids, rejected_ids, pair); drops pairs whose two texts are identical (they teach
    nothing and would count as ties) and reports truncation."""
    out, same, cut = [], 0, 0
    for p in pairs:
        c = encode(tok, p["prompt"], p["chosen"], max_length)
        r = encode(tok, p.get("rejected_prompt", p["prompt"]), p["rejected"], max_length)
        if c == r:
            same += 1
            continue
        for prompt, resp in ((p["prompt"], p["chosen"]), (p.get("rejected_prompt", p["prompt"]), p["rejected"])):
            cut += len(tok.encode(format_dialogue(prompt, resp), bos=False)) + 1 > max_length
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
def evaluate(rm, data, batch_size=32):
    """data: list of (chosen_ids, rejected_ids, pair). Metrics, plus the score-length correlation (characters
    of the response) and per-"type" accuracy when pairs carry a type (the static HHH set)."""
    rc = rm.score_ids([d[0] for d in data], batch_size)
    rr = rm.score_ids([d[1] for d in data], batch_size)
    m = pair_metrics(rc, rr)
    lengths = torch.tensor([len(d[2]["chosen"]) for d in data] + [len(d[2]["rejected"]) for d in data])
    m["length_corr"] = pearson(torch.cat([rc, rr]), lengths.float())
    types = sorted({d[2]["type"] for d in data if "type" in d[2]})
    for t in types:
        sel = torch.tensor([d[2].get("type") == t for d in data])
        m[f"accuracy_{t}"] = (rc[sel] > rr[sel]).float().mean().item()
    return m


# -----------------------------------------------------------------------------
# scale, shared by the three trainers: precision, LoRA, gradient checkpointing, torchrun (DDP or FSDP)
#
# Precision: trained weights are fp32 (the master copy AdamW updates) and the matmuls run in --dtype under
# autocast (bf16 on CUDA). Frozen weights (a LoRA base, PPO's reference and reward model) are stored in --dtype.
# torchrun: every process takes its share of each global batch; a process's loss is its rows' share of the
# global batch's loss (a sum over its rows / the global count), so summing the gradients over processes gives
# the global batch's gradient, whatever the number of processes. DDP sums them (sync_grads, one all-reduce per
# bucket after the accumulation steps); FSDP (--fsdp) reduce-scatters them as it goes, each process keeping a
# 1/world shard of the weights, gradients and optimizer state.

@dataclass
class ScaleConfig:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = ""                # compute dtype: "" = fp32 on CPU, bf16 on CUDA
    lora_rank: int = 0             # > 0: train LoRA adapters of this rank (the base frozen) instead of every weight
    lora_alpha: float = 16.0       # adapters scale by alpha / rank
    lora_targets: str = ",".join(LORA_TARGETS)
    grad_checkpointing: bool = False   # recompute each block's activations in backward (memory for compute)
    fsdp: bool = False             # under torchrun: shard weights, gradients and optimizer state over the processes
    dry_run: bool = False          # print the memory plan of this run (per GPU; see memory.py) and stop
    gpu_gib: float = 0.0           # GPU memory the plan checks against; 0 = this machine's GPU, else 80


def memory_dry_run(cfg, model, job, rows, seq, **job_fields):
    """The memory plan of a trainer's run as configured (memory.py), printed; returns whether it fits."""
    import memory
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(cfg.device)
    if cfg.gpu_gib:
        gib = cfg.gpu_gib
    elif dev.type == "cuda" and torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(dev).total_memory / memory.GiB
    else:   # an 80 GB GPU, or this machine's RAM for a CPU run
        gib = 80.0 if dev.type == "cuda" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / memory.GiB
    dtype = compute_dtype(cfg, dev)
    j = memory.Job(job=job, dtype="fp32" if dtype == torch.float32 else "bf16", lora_rank=cfg.lora_rank,
                   lora_targets=cfg.lora_targets, grad_checkpointing=cfg.grad_checkpointing, world=world,
                   fsdp=cfg.fsdp, rows=rows, seq=seq, gpu_gib=gib, device=dev.type, **job_fields)
    text, fits = memory.describe_plan(memory.model_config(model), j, f"memory plan ({job}, {model}, {rows} rows x "
                                      f"{seq} tokens per forward, {world} process(es), {dev.type} "
                                      f"{str(dtype).removeprefix('torch.')}):")
    if rank() == 0:
        print(text)
    return fits


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), each process on its
    own GPU. Returns (rank, world_size, device)."""
    dev, world = torch.device(device), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, dev
    import torch.distributed as dist
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def barrier():
    if world_size() > 1:
        torch.distributed.barrier()


def end_distributed():
    """Leave the process group together (a process that tears gloo down while another still writes can abort)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def compute_dtype(cfg, dev):
    """A trainer's compute dtype: bf16 or fp32 (fp16 would need loss scaling, which is not written)."""
    if cfg.dtype and DTYPES.get(cfg.dtype) not in (torch.float32, torch.bfloat16):
        raise UserError(f"--dtype={cfg.dtype!r}: the trainers compute in bf16 or fp32 (fp16 training would need loss "
                        f"scaling); use --dtype=bf16 or --dtype=fp32.")
    return DTYPES.get(cfg.dtype) or default_dtype(dev)


def load_dtype(cfg, dtype):
    """Trained weights load in fp32 (masters); a LoRA base is frozen and loads in the compute dtype."""
    return dtype if cfg.lora_rank else torch.float32


def autocast(dev, dtype):
    """The context every trainer runs its forwards in: bf16 matmuls over fp32 masters (nothing on fp32)."""
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)


def prepare_for_training(module, cfg, dtype, heads=(), seed=0, trained_from=None):
    """LoRA adapters (--lora_rank) or every weight trained; gradient checkpointing; FSDP under torchrun with
    --fsdp. heads: modules trained in full even with LoRA (the reward / value head). trained_from: a LoRA
    checkpoint to resume the adapters and heads from. Returns the trained parameters, in a fixed order
    (checkpoints store optimizer moments by it)."""
    if cfg.lora_rank:
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        add_lora(module, cfg.lora_rank, cfg.lora_alpha, targets, seed)
        for h in heads:
            h.float().requires_grad_(True)
        if trained_from:
            load_trained(module, trained_from)
    else:
        module.requires_grad_(True)
    for m in module.modules():
        if isinstance(m, Llama):
            m.grad_checkpointing = cfg.grad_checkpointing
    if cfg.fsdp and world_size() > 1:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for m in module.modules():
            if isinstance(m, Block):
                fully_shard(m, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)   # sum over processes (see above), not the mean
                m.set_force_sum_reduction_for_comms(True)   # a plain sum (gloo has no pre-multiplied sum)
    return [p for p in module.parameters() if p.requires_grad]


def lora_key(cfg):
    """The LoRA settings a checkpoint must match to be resumed."""
    return f"rank={cfg.lora_rank},alpha={cfg.lora_alpha},targets={cfg.lora_targets}" if cfg.lora_rank else "off"


def describe(params, module, cfg):
    n_all, n = sum(p.numel() for p in module.parameters()), sum(p.numel() for p in params)   # (global sizes)
    return (f"training {n / 1e6:.3g}M of {n_all / 1e6:.3g}M parameters" +
            (f" (LoRA {lora_key(cfg)})" if cfg.lora_rank else "") +
            (", gradient checkpointing" if cfg.grad_checkpointing else "") +
            (f", FSDP over {world_size()} processes" if cfg.fsdp and world_size() > 1 else
             f", DDP over {world_size()} processes" if world_size() > 1 else ""))


def my_micro_batches(batch, micro):
    """This process's share of a global batch (every world-th row), cut into micro-batches, as (rows, weight)
    pairs. Every process gets the same number of micro-batches (FSDP's collectives need each process in every
    forward): a process short of rows runs the global batch's first row with weight 0."""
    r, world = rank(), world_size()
    mine = batch[r::world]
    n = -(-len(batch[0::world]) // micro)                   # the largest share's count (process 0 has the most)
    out = [(mine[i * micro:(i + 1) * micro], 1.0) for i in range(n)]
    return [(rows, w) if rows else (batch[:1], 0.0) for rows, w in out]


def sync_grads(params, cfg):
    """DDP: sum the gradients over the processes, one all-reduce per ~64M-element bucket. (FSDP has done it.)"""
    if world_size() == 1 or cfg.fsdp:
        return
    import torch.distributed as dist
    for p in params:
        if p.grad is None:   # a process whose share of the batch missed a parameter still sends zeros
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.numel()
        if size >= 2**26 or i == len(params) - 1:
            flat = torch.cat([g.flatten() for g in bucket])
            dist.all_reduce(flat)
            for g, v in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(v.view_as(g))
            bucket, size = [], 0


def clip_grads(params, max_norm):
    """Clip the global gradient norm (over every process's shard under FSDP); returns it as a float."""
    n = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full_tensor(n))


def all_sum(values):
    """Sum floats over the processes (metrics of the global batch)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# training

@dataclass
class TrainConfig(ScaleConfig):
    data: str = ""                 # pairs .jsonl (required)
    val_data: str = ""             # held-out pairs; "" splits val_frac off data
    val_frac: float = 0.05
    model: str = ""                # LLaMA folder (the pretrained base, not SFT) or a reward model to go on from
    out: str = "out/rm"
    preset: str = ""               # "tiny": settings for the bundled 260K model on CPU (see README)
    max_length: int = 1024
    batch_size: int = 128          # pairs per optimizer step (paper: 128)
    micro_batch: int = 8           # pairs per forward/backward; batch_size / micro_batch accumulation steps
    epochs: float = 1.0
    lr: float = 2e-5
    weight_decay: float = 0.1      # on matrices only
    warmup: float = 0.03           # fraction of the optimizer steps
    grad_clip: float = 1.0
    eval_every: int = 50           # optimizer steps
    log_every: int = 10
    seed: int = 1337
    on_error: str = "stop"         # a malformed data line: "stop" or "skip"
    resume: bool = True            # go on from out/last if it is there
    stop_after: int = 0            # stop (saving out/last) after this many optimizer steps in this run; 0 = run to the end


PRESETS = {"tiny": dict(model=os.path.join(HERE, "data", "stories260K"), max_length=512, batch_size=32,
                        micro_batch=16, lr=1e-3, weight_decay=0.0, epochs=3.0, eval_every=25, log_every=5)}
EVAL_FILES = ("hhh_eval.json", "test.jsonl.gz", "mc_task.json", "task.json", "question.jsonl")


def lr_at(step, total, lr, warmup):
    """Linear warmup over a `warmup` fraction of the steps, then cosine decay to 0."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def make_optimizer(module, lr, weight_decay):
    """AdamW with weight decay on matrices only (not on norms or biases)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def save_training_checkpoint(save, params, opt, path, state, module=None):
    """A model (save(path, files=...) writes it) plus optimizer moments (safetensors) and trainer state (json),
    in one atomic step; for a LoRA run (module given) also adapters.safetensors, the trained tensors by name, which
    a resumed run puts back on its base model. Every process calls this (FSDP gathers each sharded moment, a
    collective); process 0 writes. Moments are stored whole, so a run resumes on any number of processes."""
    from safetensors.torch import save_file
    tensors = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                v = full_tensor(v)
                if rank() == 0:
                    tensors[f"{i}.{k}"] = v.cpu().contiguous()
    files = {"optimizer.safetensors": lambda f: save_file(tensors, f),
             "trainer_state.json": lambda f: write_json(f, state)}
    if module is not None and any(".lora_" in n for n, _ in module.named_parameters()):
        trained = {n: full_tensor(p).cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        files["adapters.safetensors"] = lambda f: save_file(trained, f)
    save(path, files=files)


def load_trained(module, path):
    """Put a LoRA run's trained tensors (adapters.safetensors: adapters and heads, by name) back on `module`."""
    from safetensors.torch import load_file
    f = os.path.join(path, "adapters.safetensors")
    if not os.path.isfile(f):
        raise UserError(f"{f}: missing, so this LoRA run cannot resume from {path}. Pass --resume=false (or a new "
                        f"--out) to start over.")
    params = dict(module.named_parameters())
    for n, t in load_file(f).items():
        if n not in params or params[n].shape != t.shape:
            raise UserError(f"{f}: tensor '{n}' does not fit this model: {path} belongs to another run (another "
                            f"--lora_rank or --lora_targets?). Give a new --out to start over.")
        params[n].data.copy_(t)




def start_or_resume(out, last, state, run, optimizers):
    """The prologue every trainer shares. If `last` holds a trainer_state.json: check it belongs to this run (same
    `run` fields), take its state and load the optimizer moments ([(params, optimizer, folder)]). Then record `run`
    in the state and drop the metrics lines past its step. Returns the state."""
    path = os.path.join(last, "trainer_state.json")
    if os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)
        check_same_run(state, run, last)
        for params, opt, folder in optimizers:
            load_optimizer(params, opt, folder)
        if rank() == 0:
            print(f"resuming from {last} at step {state['step']}")
    state.update(run)
    if rank() == 0:
        os.makedirs(out, exist_ok=True)
        trim_metrics(os.path.join(out, "metrics.jsonl"), state["step"])
    return state


def check_same_run(state, run, last):
    """Resume only the run a checkpoint belongs to: same data and schedule, else one clear message."""
    for k, v in run.items():
        if k in state and state[k] != v:
            raise UserError(f"{last} belongs to another run ({k}: {state[k]!r}, now {v!r}). Give a new --out, or "
                            f"--resume=false to start over there.")


def trim_metrics(path, step):
    """A run that resumes from its last checkpoint repeats the steps after it: drop their lines (and a half-written
    last line) from metrics.jsonl first, so no step is logged twice. Used by every trainer."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path, encoding="utf-8"):
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:
            pass
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def load_optimizer(params, opt, path):
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    for i, p in enumerate(params):
        st = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        for k, v in st.items():
            if v.shape == p.shape and hasattr(p, "device_mesh"):   # FSDP: shard the moment as its parameter
                from torch.distributed.tensor import distribute_tensor
                st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            elif v.dim() > 0:
                st[k] = v.to(p.device)
        if st:
            opt.state[p] = st


def train(cfg):
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise UserError(f"--preset={cfg.preset!r}: known presets are {', '.join(PRESETS)}.")
        defaults = TrainConfig()
        for k, v in PRESETS[cfg.preset].items():
            if getattr(cfg, k) == getattr(defaults, k):   # flags given on the command line win
                setattr(cfg, k, v)
    if not cfg.model:
        raise UserError("--model is required: a LLaMA folder (the base model) or --preset=tiny.")
    if cfg.dry_run:   # chosen and rejected of a micro-batch share one forward: 2 x micro_batch rows
        return memory_dry_run(cfg, cfg.model, "rm", 2 * cfg.micro_batch, cfg.max_length)
    if not cfg.data:
        raise UserError("--data is required: a .jsonl file of {\"prompt\", \"chosen\", \"rejected\"} lines.")
    for f in (cfg.data, cfg.val_data):
        if f and os.path.basename(f) in EVAL_FILES:
            raise UserError(f"{f}: this is an evaluation set (it carries a canary); never train on it.")
    if cfg.on_error not in ("stop", "skip"):
        raise UserError("--on_error must be 'stop' or 'skip'.")
    if cfg.batch_size % cfg.micro_batch:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of --micro_batch={cfg.micro_batch}.")
    r0, world, dev = setup_distributed(cfg.device)
    if cfg.batch_size % world:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of the {world} processes.")
    dtype = compute_dtype(cfg, dev)
    last, best = os.path.join(cfg.out, "last"), os.path.join(cfg.out, "best")
    resuming = cfg.resume and os.path.isfile(os.path.join(last, "trainer_state.json"))
    # a full run resumes from last/'s weights; a LoRA run from its base plus last/'s adapters and head
    rm = RewardModel.from_pretrained(last if resuming and not cfg.lora_rank else cfg.model, device=dev,
                                     dtype=load_dtype(cfg, dtype), max_length=cfg.max_length, seed=cfg.seed)
    if resuming and cfg.lora_rank:
        rm.normalizer = load_config(last).extra.get("reward_normalizer", rm.normalizer)
    params = prepare_for_training(rm, cfg, dtype, heads=[rm.head], seed=cfg.seed,
                                  trained_from=last if resuming and cfg.lora_rank else None)

    # data: tokenized once; a seeded split and a seeded order per epoch, so a resumed run sees the same stream
    pairs = read_pairs(cfg.data, cfg.on_error)
    rng = random.Random(cfg.seed)
    if cfg.val_data:
        train_pairs, val_pairs = pairs, read_pairs(cfg.val_data, cfg.on_error)
    else:
        idx = list(range(len(pairs)))
        rng.shuffle(idx)
        n_val = max(1, int(round(cfg.val_frac * len(pairs)))) if len(pairs) > 1 else 0
        if n_val == 0:
            raise UserError(f"{cfg.data}: one pair cannot be split into train and held-out; add pairs or "
                            f"give --val_data.")
        val_pairs, train_pairs = [pairs[i] for i in idx[:n_val]], [pairs[i] for i in idx[n_val:]]
    train_set = tokenize_pairs(rm.tok, train_pairs, cfg.max_length, cfg.data)
    val_set = tokenize_pairs(rm.tok, val_pairs, cfg.max_length, cfg.val_data or cfg.data + " (held out)")
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    if len(train_set) < cfg.batch_size:
        print(f"note: {len(train_set)} training pairs < --batch_size={cfg.batch_size}: one step per epoch uses "
              f"them all", file=sys.stderr)
    total = max(1, int(cfg.epochs * steps_per_epoch))

    opt = make_optimizer(rm, cfg.lr, cfg.weight_decay)
    state = {"step": 0, "best_accuracy": -1.0}
    run = {"data": os.path.abspath(cfg.data), "train_pairs": len(train_set), "total_steps": total,
           "lora": lora_key(cfg)}
    state = start_or_resume(cfg.out, last, state, run, [(params, opt, last)] if resuming else [])
    main = r0 == 0
    if main:
        write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
        print(f"{len(train_set)} training pairs, {len(val_set)} held out; {total} steps of {cfg.batch_size} pairs "
              f"({world} process(es), micro-batches of {cfg.micro_batch}); lr {cfg.lr}; "
              f"{dev} {str(dtype).removeprefix('torch.')}; {describe(params, rm, cfg)}")

    def step_pairs(step):
        """The pairs of optimizer step `step`: epoch e's order is a shuffle seeded by (seed, e)."""
        e, k = divmod(step, steps_per_epoch)
        order = list(range(len(train_set)))
        random.Random(cfg.seed * 1000 + e).shuffle(order)
        return [train_set[j] for j in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]

    def log(rec):
        if main:
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    rm.train()
    bar = tqdm(range(state["step"], total), initial=state["step"], total=total, desc="rm", dynamic_ncols=True,
               disable=not main)
    t0, pairs_done, sums, first = time.time(), 0, [0.0] * 4, state["step"]
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup)
        batch = step_pairs(step)
        for mb, weight in my_micro_batches(batch, cfg.micro_batch):        # this process's share
            # chosen and rejected of a micro-batch go through one forward (2m rows, left padded)
            idx, mask = pad_batch([c for c, _, _ in mb] + [r for _, r, _ in mb], device=dev)
            with autocast(dev, dtype):
                r = rm(idx, mask)                                              # (2m,)
            rc, rr = r[:len(mb)], r[len(mb):]
            loss = weight * F.softplus(rr - rc).sum() / len(batch)             # its share of the global batch mean
            loss.backward()
            if not weight:
                continue
            m = pair_metrics(rc.detach(), rr.detach())
            sums = [a + b for a, b in zip(sums, (m["loss"] * m["n"], m["accuracy"] * m["n"], m["margin"] * m["n"],
                                                 m["n"]))]
        sync_grads(params, cfg)
        gnorm = clip_grads(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pairs_done += len(batch)
        state["step"] = step + 1
        if state["step"] % cfg.log_every == 0 or state["step"] == total:
            loss_sum, acc_sum, margin_sum, n = all_sum(sums)
            rec = {"step": state["step"], "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
                   "pairs_per_s": pairs_done / (time.time() - t0), "loss": loss_sum / n, "accuracy": acc_sum / n,
                   "margin": margin_sum / n}
            sums = [0.0] * 4
            log({"split": "train", **rec})
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}")
        if state["step"] % cfg.eval_every == 0 or state["step"] == total:
            with autocast(dev, dtype):   # every process scores the whole held-out set (FSDP needs them all)
                m = evaluate(rm, val_set, batch_size=2 * cfg.micro_batch)
                # normaliser on the held-out responses, so a KL coefficient means the same across runs
                rm.fit_normalizer([d[0] for d in val_set] + [d[1] for d in val_set], 2 * cfg.micro_batch)
            rm.train()
            log({"split": "val", "step": state["step"], **m})
            if main:
                tqdm.write(f"step {state['step']}: held-out accuracy {m['accuracy']:.4f} loss {m['loss']:.4f} "
                           f"margin {m['margin']:.3f} length corr {m['length_corr']:.3f}")
            improved = m["accuracy"] > state["best_accuracy"]
            if improved:
                state["best_accuracy"] = m["accuracy"]
                rm.save_pretrained(best)
            save_training_checkpoint(rm.save_pretrained, params, opt, last, state, rm)
        elif cfg.stop_after and step + 1 - first == cfg.stop_after:
            save_training_checkpoint(rm.save_pretrained, params, opt, last, state, rm)
        if cfg.stop_after and step + 1 - first == cfg.stop_after:
            if main:
                tqdm.write(f"stopping after {cfg.stop_after} steps (--stop_after); rerun to go on from {last}")
            break
    bar.close()
    if state["step"] < total:
        return state
    if main:
        print(f"done: best held-out accuracy {state['best_accuracy']:.4f}; reward model in {best}")
    return state


# -----------------------------------------------------------------------------
# evaluation CLI

@dataclass
class EvalConfig:
    rm: str = ""                    # a reward model folder
    data: str = ""                  # pairs file; "" = the bundled static HHH set and Anthropic HH test splits
    max_pairs: int = 0              # 0 = all
    batch_size: int = 16
    on_error: str = "stop"
    out: str = ""                   # optional json file for the results
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = ""


def run_eval(cfg):
    if not cfg.rm:
        raise UserError("--rm is required: a reward model folder (e.g. out/rm/best).")
    rm = RewardModel.from_pretrained(cfg.rm, device=cfg.device, dtype=DTYPES.get(cfg.dtype))
    sets = {cfg.data: cfg.data} if cfg.data else {
        "static HHH": os.path.join(HERE, "data", "almost", "hhh_eval.json"),
        "HH harmless-base test": os.path.join(HERE, "data", "hh-rlhf", "harmless-base", "test.jsonl.gz"),
        "HH helpful-base test": os.path.join(HERE, "data", "hh-rlhf", "helpful-base", "test.jsonl.gz")}
    results = {}
    for name, path in sets.items():
        pairs = read_pairs(path, cfg.on_error)
        if cfg.max_pairs:
            pairs = pairs[:cfg.max_pairs]
        m = evaluate(rm, tokenize_pairs(rm.tok, pairs, rm.max_length, path), cfg.batch_size)
        results[name] = m
        per_type = "  ".join(f"{k.removeprefix('accuracy_')} {v:.3f}" for k, v in m.items()
                             if k.startswith("accuracy_"))
        print(f"{name}: {m['n']} pairs, accuracy {m['accuracy']:.4f}" + (f" ({per_type})" if per_type else "") +
              f", margin {m['margin']:.3f}, score mean {m['score_mean']:.3f} std {m['score_std']:.3f}, "
              f"corr(score, length) {m['length_corr']:.3f}")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


BUNDLED_PAIRS = os.path.join(HERE, "data", "stories", "comparisons.jsonl")


def main(argv):
    if argv and argv[0] == "eval":
        return run_eval(parse_args(EvalConfig, argv[1:]))
    cfg = parse_args(TrainConfig, argv)
    if not cfg.data and not cfg.model and not cfg.preset:
        # no arguments: the synthetic comparisons the bundled story profile made (almost.py), tiny preset, in a
        # folder of its own (out/rm is the pipeline's)
        cfg.data, cfg.preset = BUNDLED_PAIRS, "tiny"
        if cfg.out == TrainConfig().out:
            cfg.out = "out/rm_bundled"
        print(f"no --data/--model: training on the bundled synthetic comparisons {cfg.data} with --preset=tiny")
    state = train(cfg)
    end_distributed()
    return state


if __name__ == "__main__":
    run_cli(main)
