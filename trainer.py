"""
What the three trainers (rm.py, sft.py, ppo.py) share, so that each of them holds only its own loss and loop:
torchrun processes, precision, LoRA / gradient checkpointing / FSDP, batches, the optimizer and its schedule,
gradient sync and clipping, checkpoints with resume, and the memory plan of a dry run.

Precision: trained weights are fp32 (the master copy AdamW updates) and the matmuls run in --dtype under autocast
(bf16 on CUDA). A LoRA base is frozen and stored in --dtype; PPO's reference and reward model are stored as the
policy and value model compute (frozen_dtype), so that the reference starts at KL 0 in every precision.

torchrun: every process takes its share of each global batch; a process's loss is its rows' share of the global
batch's loss (a sum over its rows / the global count), so summing the gradients over processes gives the global
batch's gradient, whatever the number of processes. DDP sums them (sync_grads, one all-reduce per bucket after the
accumulation steps); FSDP (--fsdp) reduce-scatters them as it goes, each process keeping a 1/world shard of the
weights, gradients and optimizer state.
"""
import datetime
import gc
import math
import os
import sys
import random
from dataclasses import asdict, dataclass

import torch

import memory
from common import MetricsLog, UserError, derive_seed, rank, read_json, world_size, write_json
from lora import LORA_TARGETS, LoRALinear, add_lora, full_tensor
from model import DTYPES, Block, Llama, default_dtype, hf_name


@dataclass
class ScaleConfig:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda (under torchrun: each process's GPU)
    dtype: str = ""                # compute dtype: "" = fp32 on CPU, bf16 on CUDA
    lora_rank: int = 0             # > 0: train LoRA adapters of this rank (the base frozen) instead of every weight
    lora_alpha: float = 16.0       # adapters scale by alpha / rank
    lora_targets: str = ",".join(LORA_TARGETS)  # the linear layers that get adapters, comma-separated
    grad_checkpointing: bool = False   # recompute each block's activations in backward (memory for compute)
    fsdp: bool = False             # under torchrun: shard weights, gradients and optimizer state over the processes
    dry_run: bool = False          # print the memory plan of this run (per GPU; see memory.py) and stop
    gpu_gib: float = 0.0           # GPU memory the plan checks against; 0 = this machine's GPU, else 80
    max_bad_steps: int = 3         # optimizer steps in a row skipped for a non-finite gradient before the run stops
    max_shard_gb: float = 5.0      # checkpoints are written in safetensors files of at most this many GB each


# -----------------------------------------------------------------------------
# processes

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)   # a collective that waits longer is a hang: the run stops
MASTER_ALONE_TIMEOUT = datetime.timedelta(days=2)     # barrier(): as long as process 0 works alone (an evaluation)
WAIT_GROUP = None                                     # the gloo group barrier() waits in


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), each process on its
    own GPU. Returns (master_process, world_size, device); the master process (rank 0) prints, logs and saves.
    A collective that waits past COLLECTIVE_TIMEOUT ends the run (a hang, not a slow step); where process 0 works alone
    (it evaluates, or compares policies) the others wait in barrier(), whose group waits as long as that takes."""
    global WAIT_GROUP
    dev, world = torch.device(device), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return True, 1, dev
    import torch.distributed as dist
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                                device_id=dev if dev.type == "cuda" else None)
        WAIT_GROUP = dist.new_group(backend="gloo", timeout=MASTER_ALONE_TIMEOUT)
    return dist.get_rank() == 0, world, dev


def barrier():
    """Every process waits here for the others, for as long as process 0 may work alone (MASTER_ALONE_TIMEOUT): the
    pipeline's stages end with one, and so does process 0's evaluation of a checkpoint the others take no part in."""
    if world_size() > 1:
        torch.distributed.barrier(group=WAIT_GROUP)


def from_master(x):
    """Process 0's float x in every process: a decision that changes which collectives run (save the best checkpoint,
    say) is taken once, on process 0's figure, never on figures that may differ in the last bit between processes."""
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.broadcast(t, src=0)
    return t.item()


def end_distributed():
    """Leave the process group together (a process that tears gloo down while another still writes can abort), and
    let the process groups go while the interpreter is whole: call it once the models are gone (an FSDP module holds
    its process group). A group that outlives this is freed in the interpreter's teardown, where gloo's worker threads
    can no longer take the GIL, and the process aborts ("terminate called without an active exception")."""
    global WAIT_GROUP
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        WAIT_GROUP = None
        gc.collect()


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
# precision

def check_flags(cfg):
    """The shared flags a trainer refuses before anything loads."""
    for bad, message in ((cfg.grad_clip <= 0, f"--grad_clip={cfg.grad_clip}: give the largest gradient norm, above 0 "
                                              f"(0 would zero every gradient)."),
                         (cfg.max_bad_steps < 1, f"--max_bad_steps={cfg.max_bad_steps}: give 1 or more."),
                         (cfg.max_shard_gb <= 0, f"--max_shard_gb={cfg.max_shard_gb}: give a size in GB above 0 (5 is "
                                                 f"HF's default).")):
        if bad:
            raise UserError(message)


def compute_dtype(cfg, dev):
    """A trainer's compute dtype: bf16 or fp32 (fp16 would need loss scaling, which is not written)."""
    if cfg.dtype and cfg.dtype not in DTYPES:
        raise UserError(f"--dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}.")
    if cfg.dtype and DTYPES[cfg.dtype] not in (torch.float32, torch.bfloat16):
        raise UserError(f"--dtype={cfg.dtype!r}: the trainers compute in bf16 or fp32 (fp16 training would need loss "
                        f"scaling); use --dtype=bf16 or --dtype=fp32.")
    return DTYPES.get(cfg.dtype) or default_dtype(dev)


def load_dtype(cfg, dtype):
    """Trained weights load in fp32 (masters); a LoRA base is frozen and loads in the compute dtype."""
    return dtype if cfg.lora_rank else torch.float32


def frozen_dtype(cfg, dtype):
    """The weight dtype of a frozen copy of a trained model (PPO's reference beside the policy, its reward model beside
    the value model) that computes exactly what the trained model computes before its first step: fp32 when every
    weight is trained (the fp32 masters under autocast: fp32 embeddings, norms and residual stream, bf16 matmuls);
    the compute dtype with LoRA (the frozen base is stored in it) and under FSDP (which computes with copies in it)."""
    return dtype if cfg.lora_rank or (cfg.fsdp and world_size() > 1) else torch.float32


def autocast(dev, dtype):
    """The context every trainer runs its forwards in: bf16 matmuls over fp32 masters (nothing on fp32)."""
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)


# -----------------------------------------------------------------------------
# what is trained: every weight or LoRA adapters; gradient checkpointing; FSDP

def prepare_for_training(module, cfg, dtype, heads=(), seed=0, trained_from=None):
    """LoRA adapters (--lora_rank) or every weight trained; gradient checkpointing; FSDP under torchrun with
    --fsdp. heads: modules trained in full even with LoRA (the reward / value head). trained_from: a LoRA
    checkpoint to resume the adapters and heads from. Returns the trained parameters, in a fixed order
    (checkpoints store optimizer moments by it)."""
    if cfg.lora_rank:
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        add_lora(module, cfg.lora_rank, cfg.lora_alpha, targets, seed)
        for h in heads:
            h.requires_grad_(True)
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
        for h in heads:   # the reward / value head computes in fp32 (rm.RewardModel.forward)
            fully_shard(h, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
        fully_shard(module, mp_policy=mp)
        module.set_reshard_after_forward(True)   # the root too (embeddings, head): no gathered copy left after a forward
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)   # sum over processes (see above), not the mean
                m.set_force_sum_reduction_for_comms(True)   # a plain sum (gloo has no pre-multiplied sum)
    return [p for p in module.parameters() if p.requires_grad]


def shard_bytes(cfg):
    """The most bytes one safetensors file of a checkpoint holds (--max_shard_gb, in GB of 10^9 bytes as HF counts)."""
    return int(cfg.max_shard_gb * 10**9)


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


# -----------------------------------------------------------------------------
# batches

def epoch_batch(items, step, batch_size, seed):
    """The rows of optimizer step `step`: epoch e visits the items in a shuffle seeded by (seed, e), so a resumed
    run sees the same stream."""
    e, k = divmod(step, max(1, len(items) // batch_size))
    order = list(range(len(items)))
    random.Random(derive_seed(seed, "epoch", e)).shuffle(order)
    return [items[j] for j in order[k * batch_size:(k + 1) * batch_size]]


def my_micro_batches(batch, micro):
    """This process's share of a global batch (every world-th row), cut into micro-batches, as (rows, weight)
    pairs. Every process gets the same number of micro-batches (FSDP's collectives need each process in every
    forward): a process short of rows runs the global batch's first row with weight 0."""
    r, world = rank(), world_size()
    mine = batch[r::world]
    n = -(-len(batch[0::world]) // micro)                   # the largest share's count (process 0 has the most)
    out = [(mine[i * micro:(i + 1) * micro], 1.0) for i in range(n)]
    return [(rows, w) if rows else (batch[:1], 0.0) for rows, w in out]


# -----------------------------------------------------------------------------
# the optimizer

def make_optimizer(module, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices only (not on norms or biases). On a GPU its fused kernel: one launch for
    every tensor and no temporaries (the default there, foreach, makes a temporary copy of every moment)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas,
                             fused=True if params and params[0].device.type == "cuda" else None)


def lr_at(step, total, lr, warmup):
    """Linear warmup over a `warmup` fraction of the steps, then cosine decay to 0."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


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


def optimizer_step(params, opt, cfg, max_norm, state):
    """Sum the gradients over the processes, clip their norm, step, zero them. Returns the norm before clipping.
    A non-finite norm (a NaN or inf gradient in any process) skips the step, so the weights and AdamW's moments stay as
    they were (one step on it would make them NaN for good); state["skipped_steps"] counts it and the metrics log it;
    cfg.max_bad_steps such steps in a row stop the run with one message."""
    sync_grads(params, cfg)
    norm = clip_grads(params, max_norm)          # the global norm: every process reads the same
    if all_sum([float(not math.isfinite(norm))])[0] == 0:
        opt.step()
        opt.bad_in_a_row = 0
    else:
        opt.bad_in_a_row = getattr(opt, "bad_in_a_row", 0) + 1
        state["skipped_steps"] = state.get("skipped_steps", 0) + 1
        if rank() == 0:
            print(f"warning: step {state['step'] + 1}: the gradient norm is {norm}; the optimizer step is skipped "
                  f"(weights and moments unchanged; {state['skipped_steps']} skipped in this run)", file=sys.stderr)
        if opt.bad_in_a_row >= cfg.max_bad_steps:
            raise UserError(f"{opt.bad_in_a_row} optimizer steps in a row had a non-finite gradient norm ({norm}): "
                            f"stopping (--max_bad_steps={cfg.max_bad_steps}). The last checkpoint is intact; try a lower "
                            f"--lr, or --dtype=fp32 to see whether bf16 overflows.")
    opt.zero_grad(set_to_none=True)
    return norm


# -----------------------------------------------------------------------------
# checkpoints and resume. A trainer keeps out/last (weights, optimizer moments, trainer_state.json), rewritten
# atomically; --resume=true (the default) goes on from it, --resume=false starts over.

def resume_from(cfg, base, last):
    """Where a trainer's weights come from: (folder to load, LoRA checkpoint to put the adapters back from, resuming).
    A full run resumes from last/'s weights; a LoRA run from its base plus last/'s adapters and heads."""
    if not (cfg.resume and os.path.isfile(os.path.join(last, "trainer_state.json"))):
        return base, None, False
    return (base, last, True) if cfg.lora_rank else (last, None, True)


def start_or_resume(cfg, out, last, state, run, optimizers):
    """The prologue every trainer shares. If `optimizers` ([(params, optimizer, folder)]) is given, the run resumes
    from last/: check it belongs to this run (same `run` fields), take its state, load the optimizer moments. Then
    record `run` in the state, write the run's flags to out/config.json. Returns (state, the run's MetricsLog)."""
    if optimizers:
        state = read_json(os.path.join(last, "trainer_state.json"))
        for k, v in run.items():
            if k in state and state[k] != v:
                raise UserError(f"{last} belongs to another run ({k}: {state[k]!r}, now {v!r}). Give a new --out, "
                                f"or --resume=false to start over there.")
        for params, opt, folder in optimizers:
            if os.path.isfile(os.path.join(folder, "optimizer.safetensors")):
                load_optimizer(params, opt, folder)
            elif rank() == 0 and state["step"] < run.get("total_steps", float("inf")):   # ppo.py --steps raised
                print(f"{folder} ended its run and holds no optimizer moments: the steps from here start fresh ones")
        if rank() == 0:
            print(f"resuming from {last} at step {state['step']}")
    state.update(run)
    log = MetricsLog(out, state["step"])
    if rank() == 0:
        write_json(os.path.join(out, "config.json"), asdict(cfg))
    return state, log


def save_training_checkpoint(save, params, opt, path, state, module=None, final=False):
    """A model (save(path, files=...) writes it) plus optimizer moments (safetensors) and trainer state (json),
    in one atomic step; for a LoRA run (module given) also its adapters in PEFT's layout (adapter_config.json,
    adapter_model.safetensors), which a resumed run puts back on its base model. Every process calls this (FSDP
    gathers each sharded moment, a collective); process 0 writes. Moments are stored whole, so a run resumes on any
    number of processes. The run's `final` checkpoint leaves the moments out: nothing resumes from them, and in
    fp32 they weigh twice the model (54 GB for a 7B full fine-tune)."""
    from safetensors.torch import save_file
    tensors = {}
    for i, p in enumerate(params if not final else []):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                v = full_tensor(v)
                if rank() == 0:
                    tensors[f"{i}.{k}"] = v.cpu().contiguous()
    files = {"trainer_state.json": lambda f: write_json(f, state)}
    if not final:
        files["optimizer.safetensors"] = lambda f: save_file(tensors, f)
    if module is not None and any(".lora_" in n for n, _ in module.named_parameters()):
        trained = {peft_name(module, n): full_tensor(p).cpu().contiguous()
                   for n, p in module.named_parameters() if p.requires_grad}
        files["adapter_model.safetensors"] = lambda f: save_file(trained, f, metadata={"format": "pt"})
        files["adapter_config.json"] = lambda f: write_json(f, peft_config(module))
    save(path, files=files)


# LoRA adapters in PEFT's layout: peft.PeftModel.from_pretrained(base, folder) loads them onto the base model

def peft_name(module, name):
    """Our trained parameter's name -> PEFT's tensor name ("base_model.model." + the HF name; a reward model's head
    is HF's "score", saved whole as a module to save)."""
    hf = hf_name(name) if isinstance(module, Llama) else "score.weight" if name == "head.weight" else name
    return "base_model.model." + hf + (".weight" if name.endswith((".lora_A", ".lora_B")) else "")


def peft_config(module):
    """adapter_config.json of the adapters on `module` (rank, alpha and targets read off its LoRA layers)."""
    layers = {n.rsplit(".", 1)[-1]: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    some = next(iter(layers.values()))
    rank = some.lora_A.shape[0]
    causal = isinstance(module, Llama)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else "SEQ_CLS", "r": rank,
            "lora_alpha": some.scale * rank, "target_modules": sorted(layers), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None if causal else ["score"], "base_model_name_or_path": None}


def load_trained(module, path):
    """Put a LoRA run's trained tensors (adapter_model.safetensors: adapters and heads) back on `module`."""
    from safetensors.torch import load_file
    f = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(f):
        raise UserError(f"{f}: missing, so this LoRA run cannot resume from {path}. Pass --resume=false (or a new "
                        f"--out) to start over.")
    params = {peft_name(module, n): p for n, p in module.named_parameters() if p.requires_grad}
    tensors = load_file(f)
    for n, p in params.items():
        t = tensors.get(n)
        if t is None or p.shape != t.shape:
            raise UserError(f"{f}: no tensor '{n}' of shape {tuple(p.shape)}: {path} belongs to another run (another "
                            f"--lora_rank or --lora_targets?). Give a new --out to start over.")
        p.data.copy_(t)


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


# -----------------------------------------------------------------------------
# the memory plan of a run (--dry_run=true)

def memory_dry_run(cfg, model, job, rows, seq, **job_fields):
    """The memory plan of a trainer's run as configured (memory.py), printed; returns whether it fits."""

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
