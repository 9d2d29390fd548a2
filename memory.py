"""
Memory plans: what one GPU holds for a training or sampling job, from the model's shapes alone (no weights are
read), and whether it fits. The trainers print theirs with --dry_run=true.

    python memory.py --model=llama-2-7b --job=rm                                    # paper RM, full, 1 GPU
    python memory.py --model=llama-2-7b --job=rm --lora_rank=16 --grad_checkpointing=true
    python memory.py --model=llama-2-7b --job=ppo --lora_rank=16 --grad_checkpointing=true
    python memory.py --model=llama-2-7b --job=sft --world=8 --fsdp=true
    python memory.py --model=path/to/llama --job=sample --rows=32 --seq=2048

--model is a folder with a config.json or one of the named shapes below. The accounting follows this project's
code line by line (which tensors its forward saves for backward, in which dtype), checked against the saved
tensors of real forwards on the CPU (tests/test_memory.py). Assumed: fused attention (flash / memory-efficient,
no T x T scores kept; what PyTorch picks on recent GPUs), and nothing for the caching allocator's fragmentation:
leave a few GiB of headroom.
"""
import json
import os
import weakref
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from common import UserError, model_folder, parse_args, run_cli
from lora import LORA_TARGETS
from model import LlamaConfig, load_config

GiB = 2**30


class AllocationTracker(TorchDispatchMode):
    """with AllocationTracker(model) as t: ... -> t.peak, the most bytes of tensor storage alive at once inside, and
    t.live now. Counted: the storages of the tensors given (a model's weights and buffers), and every storage an aten
    op makes inside (outputs, what autograd saves, gradients, optimizer state, a KV cache), each from its making to
    the death of its last reference, once however many views share it. Not seen: a kernel's workspace that never
    becomes a tensor. reset() starts a new peak from what is alive now."""

    def __init__(self, *tensors):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}                                   # id(storage) -> bytes, while it is alive
        for t in tensors:
            self.track(t)

    def track(self, t):
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
            return   # (a tensor subclass, FSDP's DTensor say, wraps plain tensors that are counted themselves)
        s = t.untyped_storage()
        if id(s) in self.sizes or s.nbytes() == 0:
            return
        self.sizes[id(s)] = s.nbytes()
        self.live += s.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(s, self.free, id(s))

    def free(self, key):
        self.live -= self.sizes.pop(key, 0)

    def reset(self):
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if type(t) in (torch.Tensor,
                                                                                           torch.nn.Parameter)}
        for t in tree_leaves(out):
            if not (isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, torch.nn.Parameter)
                    and id(t.untyped_storage()) in inputs):   # a view or an in-place result: no new memory
                self.track(t)
        return out

    def __enter__(self):   # FSDP frees and refills its gathered weights by resizing their storage in place
        real = self.real_resize = torch.UntypedStorage.resize_

        def resize(s, n):
            before = self.sizes.get(id(s))
            out = real(s, n)
            if before is not None:
                self.sizes[id(s)] = n
                self.live += n - before
                self.peak = max(self.peak, self.live)
            elif n:
                self.sizes[id(s)] = n
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self.free, id(s))
            return out
        torch.UntypedStorage.resize_ = resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self.real_resize
        return super().__exit__(*exc)

# public shapes (config.json fields of the released checkpoints), for planning before downloading anything
SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, max_position_embeddings=2048),
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000, max_position_embeddings=2048),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_theta=1000000.0),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768,
                       rope_theta=1000000.0),
}


def model_config(model):
    """A LlamaConfig from a folder's config.json or a named shape."""
    if model in SHAPES:
        return LlamaConfig.from_dict({"model_type": "llama", **SHAPES[model]}, where=model)
    model = model_folder(model, "--model", weights=False)
    if os.path.isdir(model):
        return load_config(model)
    raise UserError(f"--model={model!r}: not a model folder, nor a known shape ({', '.join(SHAPES)}).")


# -----------------------------------------------------------------------------
# parameters

def linear_shapes(cfg):
    """{name: (in, out)} of one block's linear layers."""
    C, H, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C),
            "gate_proj": (C, H), "up_proj": (C, H), "down_proj": (H, C)}


def block_params(cfg):
    C, H = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    bias = (q + 2 * kv) * cfg.qkv_bias + C * cfg.attention_bias + (2 * H + C) * cfg.mlp_bias
    return sum(i * o for i, o in linear_shapes(cfg).values()) + bias + 2 * C      # linears, biases, two norms


def param_counts(cfg, lm_head=True):
    """(all parameters, those of the linear layers) of a LLaMA; lm_head=False: a reward model's trunk + head."""
    C, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    head = (V * C if not cfg.tie_word_embeddings else 0) if lm_head else C          # the RM head is (1, C)
    matrices = L * sum(i * o for i, o in linear_shapes(cfg).values()) + (V * C if lm_head else 0)
    return V * C + L * block_params(cfg) + C + head, matrices                      # + embedding, final norm


def lora_params(cfg, rank, targets):
    return cfg.num_hidden_layers * sum(rank * (i + o) for n, (i, o) in linear_shapes(cfg).items() if n in targets)


# -----------------------------------------------------------------------------
# activations: bytes one token keeps for backward in one block, as this project's forward saves them

def block_activation_bytes(cfg, compute_bytes, residual_bytes, trained, lora_rank=0, seq=0):
    """trained: the linear layers whose weights or adapters get gradients (names as in LORA_TARGETS); norms are
    trained with full fine-tuning only (lora_rank 0). compute_bytes: 4 (fp32) or 2 (bf16); residual_bytes: the
    residual stream's dtype (fp32 when fp32 master weights run under autocast, else the compute dtype).
    seq > 0: rows of `seq` tokens with a padding mask, which attention keeps as a (T, S) bias in each layer."""
    C, H, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    q, kv = nh * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    cb, full = compute_bytes, lora_rank == 0
    copies = cb == 2 and residual_bytes == 4      # autocast casts an fp32 input once per linear layer
    n_attn = sum(t in trained for t in ("q_proj", "k_proj", "v_proj"))
    n_mlp = sum(t in trained for t in ("gate_proj", "up_proj"))
    norm = 4 * C + 4 + (residual_bytes * C if full else 0)      # fp32 input (or its fp32 copy), 1/rms, x-hat
    return (2 * norm
            + cb * C * (n_attn if copies else min(n_attn, 1))       # q/k/v input
            + cb * C * (n_mlp if copies else min(n_mlp, 1))         # gate/up input
            + cb * (2 * q + 2 * kv) + 4 * nh                        # attention: q, k, v, output (= o_proj's
                                                                    # input), log-sum-exp
            + 3 * cb * H + (cb * H if "down_proj" in trained else 0)  # SwiGLU: gate, silu(gate), up; down input
            + cb * lora_rank * len(trained)                         # adapters' rank-r middles
            + cb * seq)                                             # the padding mask as an attention bias row


# -----------------------------------------------------------------------------
# the plan

@dataclass
class Job:
    job: str = "rm"                 # rm | sft | dpo | ppo | sample
    dtype: str = "bf16"             # compute dtype: bf16 (GPU) or fp32
    lora_rank: int = 0              # > 0: LoRA adapters of this rank are trained, the base frozen
    lora_targets: str = ",".join(LORA_TARGETS)  # the linear layers that get adapters
    grad_checkpointing: bool = False  # each block's activations recomputed in backward
    world: int = 1                  # processes (GPUs)
    fsdp: bool = False              # weights, gradients and optimizer state sharded over the processes
    rows: int = 16                  # rows per forward (rm, dpo: 2 x micro_batch; sft: micro_batch; ppo: minibatch / world)
    shared: int = 0                 # sample: tokens of a prompt prefix every row shares (prefilled and cached once)
    seq: int = 1024                 # tokens per row (ppo: prompt + response; sample: prompt + new tokens)
    new: int = 0                    # sample: the new tokens of seq (0: a prompt of seq tokens, the largest prefill)
    rollout_rows: int = 64          # ppo: rollout rows per process
    response: int = 512             # ppo: response tokens of seq
    gpu_gib: float = 80.0           # the memory to fit in (GPU memory; on device=cpu, RAM)
    device: str = "cuda"            # cuda (adds the CUDA context) or cpu


def forward_bytes(cfg, cb, res, unmerged_lora=False):
    """Bytes per token that one block's forward holds at its peak when nothing is kept for backward (a prefill, a
    scoring forward), beside the KV cache: SwiGLU's three H-wide intermediates (four while an unmerged adapter adds its
    part to one of them) with the block's input, the residual after attention and a norm's output; or attention's
    q with its rotary copies, k and v; whichever is larger. res: the residual stream's bytes, cb: the compute dtype's."""
    C, H = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    mlp = 3 * res * C + cb * H * (4 if unmerged_lora else 3)
    attention = 2 * res * C + cb * (4 * q + 2 * kv)
    return max(mlp, attention) + 2 * res * cfg.head_dim                  # + RoPE's cos and sin


def backward_bytes(cfg, cb, res):
    """Bytes per token in flight while one block's backward runs: the gradients of SwiGLU's two H-wide inputs and of
    the block's input and output."""
    return cb * (2 * cfg.intermediate_size + cfg.hidden_size) + 2 * res * cfg.hidden_size


def sampler_rows(cfg, j, cb):
    """THE sampler: the weights, the KV cache of rows x seq, and the larger of the prefill's and the decoding's
    transients. A shared prefix of P tokens is cached once; each row holds its own seq - P tokens, and the prefill of
    the rows' own tokens also holds their scores against the prefix (cascade attention, fp32, in chunks)."""
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    n, _ = param_counts(cfg)
    P = min(j.shared, j.seq - 1)
    own = j.seq - P
    rows = [("weights", cb * n)]
    if P:
        rows += [(f"KV cache of the shared prefix ({P} tokens, once)", 2 * L * kv * cb * P)]
    cache = 2 * L * kv * cb * j.rows * own
    rows += [(f"KV cache ({j.rows} rows x {own} tokens{' of their own' if P else ''})", cache)]
    prefill = [("prefill: one block's intermediates", forward_bytes(cfg, cb, cb) * max(P, j.rows * (own - j.new)))]
    if P:   # model.attention_with_lse holds at most SCORES_BYTES of them at a time
        prefill += [("prefill: the rows' scores against the prefix (fp32, in chunks)",
                     min(8 * cfg.num_attention_heads * j.rows * own * P, 2**28 + 8 * cfg.num_attention_heads * P))]
    decode = 4 * 4 * V * j.rows + cache // L                 # logits and sampling (fp32); a row compaction's layer
    return rows + (prefill if sum(b for _, b in prefill) >= decode else
                   [("decoding: logits and sampling (fp32), one layer of a row compaction", decode)])


def trained_models(j):
    """The models a job trains, each as whether it has an LM head: rm -> trunk + head; sft, dpo -> causal LM; ppo ->
    policy (LM) and value (trunk + head). (DPO's reference is its logprobs, computed before training: no model.)"""
    return {"rm": [False], "sft": [True], "dpo": [True], "ppo": [True, False]}[j.job]


def state_rows(cfg, j, cb, lora, targets, fsdp):
    """What a trainer keeps for the whole run: weights, adapters and AdamW moments of every trained model (sharded
    under FSDP), the DDP bucket, PPO's frozen reference and reward model. -> (rows, gradient bytes, notes)."""
    shard = j.world if fsdp else 1
    C = cfg.hidden_size
    rows, grads, note = [], 0, []
    for lm_head in trained_models(j):
        n, mats = param_counts(cfg, lm_head)
        name = {True: "policy" if j.job == "ppo" else "model", False: "value" if j.job == "ppo" else "model"}[lm_head]
        if lora:
            na = lora_params(cfg, j.lora_rank, targets) + (0 if lm_head else C)   # adapters (+ the head)
            part = [(f"{name} weights ({'bf16' if cb == 2 else 'fp32'} base, frozen)", cb * n / shard),
                    (f"{name} adapters{'' if lm_head else ' + head'} (fp32)", 4 * na / shard)]
        else:
            na = n
            part = [(f"{name} weights (fp32 masters)", 4 * n / shard)]
        part += [(f"{name} AdamW moments (fp32)", 8 * na / shard)]
        if fsdp:
            part.append((f"{name} FSDP gathered blocks (2 in flight)", 2 * cb * block_params(cfg)))
        elif j.world > 1:
            part.append((f"{name} DDP all-reduce bucket", 4 * min(na, 2**26)))
        grads += 4 * na / shard
        rows += part
    if j.job == "ppo":
        frozen = param_counts(cfg)[0] + param_counts(cfg, lm_head=False)[0]
        if lora and not fsdp:
            note.append("reference = policy with adapters off, reward model = value trunk with adapters off: no copies")
        else:   # stored as the trained models compute (trainer.frozen_dtype): step 0's reference = the policy
            fb = cb if (lora or fsdp) else 4
            rows.append((f"reference policy + reward model (frozen, {'bf16' if fb == 2 else 'fp32'})", fb * frozen))
    return rows, grads, note


def phase_rows(cfg, j, cb, lora, targets, fsdp, grads):
    """What each phase of a step holds on top of the state: {phase: rows}. Training: the gradients, what the forward
    keeps for backward (every block's activations, or each block's input alone with gradient checkpointing), the bf16
    copies autocast makes of fp32 weights, and the larger of the head's backward (the logits' fp32 log-softmax and
    gradients) and one block's (recomputed under checkpointing, with its gradients in flight). PPO also has the
    rollout (the sampler on the policy) and the scoring (no-grad forwards of a chunk of rows)."""
    L, V, C = cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    residual = 4 if (cb == 4 or (not lora and not fsdp)) else 2
    per_layer = block_activation_bytes(cfg, cb, residual, targets, j.lora_rank, j.seq)
    tokens = j.rows * j.seq
    final_norm = (4 * C + 4 + residual * C) * tokens
    kept = (residual * C if j.grad_checkpointing else per_layer) * L * tokens + final_norm
    block = ((per_layer if j.grad_checkpointing else 0) + backward_bytes(cfg, cb, residual)) * tokens
    copies = 2 * param_counts(cfg)[1] if (cb == 2 and not lora and not fsdp) else 0   # autocast's weight copies
    n_models = len(trained_models(j))

    def train(head_name, head):
        rows = [(f"activations kept for backward ({n_models} model(s), {j.rows} rows x {j.seq} tokens)",
                 n_models * kept)]
        if copies:
            rows.append(("bf16 weight copies (autocast, forward to backward)", n_models * copies))
        if j.job != "ppo":   # a step of several micro-batches: the first one's gradients are there while the next runs
            rows.append(("gradients (fp32)", grads))
        elif grads > n_models * (kept + copies):   # one backward a step: gradients fill in as activations are freed
            rows = [("gradients (fp32), made as the backward frees the activations", grads)]
        return rows + [(head_name, head) if head >= block else ("backward of one block" + (
            " (recomputed)" if j.grad_checkpointing else ""), block)]

    if j.job == "rm":
        return {"train": train("the head's backward", 0)}
    if j.job in ("sft", "dpo"):   # (DPO: chosen and rejected, the rows, in one forward)
        return {"train": train("the logits' backward (fp32 log-softmax and gradients)", 12 * V * tokens)}
    resp = j.rows * j.response
    prompt = j.seq - j.response
    cache = 2 * L * kv * cb * j.rollout_rows * j.seq
    rollout = [("KV cache of the rollout", cache),
               ("prefill: one block's intermediates", forward_bytes(cfg, cb, cb if lora or fsdp else residual)
                * j.rollout_rows * prompt)]
    if lora and cb == 4:   # fp32 layers sample with their adapters merged into copies; bf16 ones keep them apart
        merged = sum(i * o for n, (i, o) in linear_shapes(cfg).items() if n in targets) * L
        rollout.append(("LoRA adapters merged into copies of their fp32 layers (lora.merged)", cb * merged))
    elif lora:
        rollout.append(("LoRA adapters cast once for the rollout (lora.merged)", cb * lora_params(cfg, j.lora_rank,
                                                                                                  targets)))
    if fsdp:
        rollout.append(("the policy gathered whole for the rollout (sample.gathered)", cb * param_counts(cfg)[0]))
    scoring = max(forward_bytes(cfg, cb, residual, unmerged_lora=lora) * tokens, 8 * V * resp)  # logits, log-softmax
    return {"rollout": rollout,
            "scoring": [(f"a scoring chunk of {j.rows} rows (no grad): a block's forward or the logits", scoring)],
            "train": train("the policy logits' backward (fp32 log-softmax, entropy and gradients)", 12 * V * resp)}


def plan(cfg, j):
    """-> (rows [(component, bytes)], peak bytes, note). Every figure is per GPU: what the run keeps throughout
    (state_rows) plus the largest phase of a step (phase_rows)."""
    if j.job not in ("rm", "sft", "dpo", "ppo", "sample"):
        raise UserError(f"--job={j.job!r}: plan one of rm, sft, dpo, ppo, sample.")
    cb = 4 if j.dtype == "fp32" else 2
    context = [("CUDA context and kernels (about)", 0.6 * GiB)] if j.device == "cuda" else []
    if j.job == "sample":
        rows = sampler_rows(cfg, j, cb) + context
        return rows, sum(b for _, b in rows), ""
    lora = j.lora_rank > 0
    targets = tuple(t.strip() for t in j.lora_targets.split(",") if t.strip()) if lora else LORA_TARGETS
    fsdp = j.fsdp and j.world > 1
    rows, grads, note = state_rows(cfg, j, cb, lora, targets, fsdp)
    rows += context
    static = sum(b for _, b in rows)
    phases = phase_rows(cfg, j, cb, lora, targets, fsdp, grads)
    worst = max(phases, key=lambda k: sum(b for _, b in phases[k]))
    for k, part in phases.items():
        rows += [(f"[{k}] {name}", b) for name, b in part]
    peak = static + sum(b for _, b in phases[worst])
    note.append(f"peak in the {worst} phase" if len(phases) > 1 else "")
    return rows, peak, "; ".join(n for n in note if n)


def size(b):
    return f"{b / GiB:9.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:9.1f} MiB"


def largest_batch(cfg, j):
    """The most rows a sampling job of j.seq tokens per row can hold in j.gpu_gib (0 if not one)."""
    lo, hi = 0, 1
    while plan(cfg, replace(j, rows=hi))[1] <= j.gpu_gib * GiB and hi < 2**20:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan(cfg, replace(j, rows=mid))[1] <= j.gpu_gib * GiB else (lo, mid)
    return lo


def describe_plan(cfg, j, title=""):
    rows, peak, note = plan(cfg, j)
    out = [title or f"memory plan: {j.job}", ""]
    for name, b in rows:
        out.append(f"  {name:<72} {size(b)}")
    fits = peak <= j.gpu_gib * GiB
    where = "per GPU" if j.device == "cuda" else "(CPU)"
    out.append(f"  {'peak ' + where:<72} {size(peak)}  ->  "
               + (f"fits in {j.gpu_gib:.3g} GiB" if fits else f"does NOT fit in {j.gpu_gib:.3g} GiB"))
    if note:
        out.append(f"  ({note})")
    if j.job == "sample":
        k = largest_batch(cfg, j)
        out.append(f"  the largest batch that fits: {k} rows of {j.seq} tokens" if k else
                   f"  not even one row of {j.seq} tokens fits: more GPUs (tensor parallel) or a smaller model")
    elif not fits:
        out.append("  to fit: --lora_rank (frozen bf16 base), --grad_checkpointing=true, smaller --micro_batch / "
                   "--minibatch, or torchrun over more GPUs with --fsdp=true")
    return "\n".join(out), fits


# -----------------------------------------------------------------------------
# the plan held against real allocations: each job run at small shapes on the CPU, its peak measured

CHECK_SHAPES = {   # (model shape, rows and tokens of the jobs)
    "tiny": (dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512), 64),
    "small": (dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=512), 128),
}
CHECK_JOBS = {"rm": 8, "sft": 4, "dpo": 8, "ppo": 4, "sample": 8}   # rows per forward (rm, dpo: 4 pairs)
CHECK_SETTINGS = {   # the paper's profile on a GPU (bf16, LoRA, checkpointing) and a CPU run's (fp32, every weight or LoRA)
    "paper": dict(dtype="bf16", lora_rank=8, grad_checkpointing=True), "full": dict(dtype="fp32"),
    "lora": dict(dtype="fp32", lora_rank=8)}


def check_jobs(shapes):
    """[(shape name, settings name, LlamaConfig, Job)] of every case --check runs."""
    out = []
    for shape in shapes:
        fields, seq = CHECK_SHAPES[shape]
        cfg = LlamaConfig.from_dict({"model_type": "llama", **fields}, where=shape)
        for job, rows in CHECK_JOBS.items():
            for name, s in CHECK_SETTINGS.items():
                if job == "sample" and name == "lora":
                    continue                                   # (the sampler has no LoRA setting: paper is bf16)
                if job == "sample":
                    s = dict(dtype=s["dtype"])
                extra = dict(rollout_rows=8, response=seq // 2) if job == "ppo" else dict(new=seq // 4) \
                    if job == "sample" else {}
                out.append((shape, name, cfg, Job(job=job, rows=rows, seq=seq, device="cpu", **s, **extra)))
    return out


def measure(cfg, j):
    """The peak of allocated bytes (AllocationTracker) of one step of job j on a random model of shape cfg, on the CPU,
    through the project's own code: an RM, SFT or DPO step of two micro-batches (the first one's gradients are there while
    the second runs) after a first step (AdamW's moments exist); a PPO step (rollout, scoring, PPO epoch) after a first;
    the sampler on rows prompts. Its weights and the models' are counted from the start."""
    import tempfile
    import ppo as ppolib
    from rm import RewardModel, TrainConfig, train_step
    from sample import generate
    from sft import Config as SFTConfig, sft_loss
    from dpo import Config as DPOConfig, train_step as dpo_train_step
    from model import Llama
    from tokenizer import Tokenizer
    from trainer import make_optimizer, optimizer_step, prepare_for_training
    dtype, dev = (torch.float32 if j.dtype == "fp32" else torch.bfloat16), torch.device("cpu")
    tok = Tokenizer(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stories260K"))
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()   # noqa: E731
    weights = lambda *ms: [t for m in ms if m is not None for t in [*m.parameters(), *m.buffers()]]  # noqa: E731
    scale = dict(device="cpu", dtype=j.dtype, lora_rank=j.lora_rank, grad_checkpointing=j.grad_checkpointing)
    torch.manual_seed(0)
    if j.job == "sample":
        model = Llama(cfg).init_weights().to(dtype)
        prompts = [ids(j.seq - j.new) for _ in range(j.rows)]
        with AllocationTracker(*weights(model)) as t:
            generate(model, prompts, j.new, temperature=1.0, seed=0, stop_ids=[], share_prefix=0)
        return t.peak
    if j.job in ("rm", "sft", "dpo"):
        model = Llama(cfg, lm_head=j.job != "rm").init_weights()
        if j.lora_rank:                                       # a LoRA base is frozen in the compute dtype
            model = model.to(dtype)
        if j.job == "rm":
            model, tc = RewardModel(model, tok, max_length=j.seq), TrainConfig(**scale, micro_batch=j.rows // 2)
            batch = [(ids(j.seq), ids(j.seq), {}) for _ in range(j.rows)]
        elif j.job == "dpo":                                  # pairs of a 1-token prompt and an answer, with reference
            tc = DPOConfig(**scale, micro_batch=j.rows // 2)  # logprobs
            batch = [(ids(j.seq), [False] + [True] * (j.seq - 1), ids(j.seq), [False] + [True] * (j.seq - 1), 0.0, 0.0)
                     for _ in range(j.rows)]
        else:
            tc, batch = SFTConfig(**scale), [(ids(j.seq), [True] * j.seq) for _ in range(2 * j.rows)]
        with AllocationTracker(*weights(model)) as t:
            params = prepare_for_training(model, tc, dtype, heads=[model.head] if j.job == "rm" else ())
            opt, state = make_optimizer(model, 1e-4, 0.0), {"step": 0}
            for step in range(2):
                t.reset()
                if j.job == "rm":                            # rm.train_step runs the micro-batches
                    train_step(model, batch, tc, dev, dtype, [0.0] * 4)
                if j.job == "dpo":                           # so does dpo.train_step
                    dpo_train_step(model, batch, tc, dev, dtype, [0.0] * 6)
                for k in range(2 if j.job == "sft" else 0):  # sft.train's loop
                    loss, n = sft_loss(model, batch[k * j.rows:(k + 1) * j.rows], dev, dtype)
                    (loss / n).backward()
                optimizer_step(params, opt, tc, 1.0, state)
        return t.peak
    with tempfile.TemporaryDirectory() as d:                 # PPO: load_models reads checkpoints
        Llama(cfg).init_weights().save_pretrained(os.path.join(d, "policy"), files=tok.files())
        RewardModel(Llama(cfg, lm_head=False).init_weights(), tok, j.seq).save_pretrained(os.path.join(d, "rm"))
        pc = ppolib.Config(policy=os.path.join(d, "policy"), rm=os.path.join(d, "rm"), batch_size=j.rollout_rows,
                           minibatch=j.rows, ppo_epochs=1, max_new_tokens=j.response, penalize_missing_eos=False,
                           **scale)
        models, _, pp, vp = ppolib.load_models(pc, tok, dev, dtype, os.path.join(d, "last"))
        prompts = [ids(j.seq - j.response) for _ in range(j.rollout_rows)]
        with AllocationTracker(*weights(models.policy, models.ref, models.value, models.reward_model)) as t:
            opts, state = (make_optimizer(models.policy, 1e-5, 0.0), make_optimizer(models.value, 1e-5, 0.0)), \
                {"step": 0, "beta": 0.05}
            for step in range(2):
                t.reset()
                r = ppolib.rollout(models, prompts, [""] * j.rollout_rows, list(range(j.rollout_rows)), tok, pc)
                ppolib.score_rollout(models, r, pc, state["beta"])
                ppolib.ppo_epochs(models, r, opts, (pp, vp), pc, torch.Generator().manual_seed(step), state)
                del r
        return t.peak


def check(shapes):
    """Each case of check_jobs: planned against measured bytes, one JSON line a case. Returns the lines' records."""
    out = []
    for shape, name, cfg, j in check_jobs(shapes):
        planned, measured = plan(cfg, j)[1], measure(cfg, j)
        out.append({"job": j.job, "shape": shape, "settings": name, "dtype": j.dtype, "lora_rank": j.lora_rank,
                    "grad_checkpointing": j.grad_checkpointing, "planned_bytes": int(planned),
                    "measured_bytes": int(measured), "ratio": round(planned / measured, 3)})
        print(json.dumps(out[-1]), flush=True)
    return out


@dataclass
class Config(Job):
    model: str = "llama-2-7b"       # a model folder or a named shape
    json: bool = False              # print the rows as JSON
    check: str = ""                 # "tiny,small": run every job at these shapes on the CPU, plan against measured


def main(argv):
    c = parse_args(Config, argv)
    if c.check:
        shapes = [s.strip() for s in c.check.split(",") if s.strip()]
        unknown = [s for s in shapes if s not in CHECK_SHAPES]
        if unknown or not shapes:
            raise UserError(f"--check={c.check!r}: give shapes from {', '.join(CHECK_SHAPES)}, e.g. --check=tiny,small.")
        return check(shapes)
    cfg = model_config(c.model)
    if c.json:
        rows, peak, note = plan(cfg, c)
        print(json.dumps({"rows": {n: b for n, b in rows}, "peak_bytes": peak, "note": note}, indent=2))
        return
    text, _ = describe_plan(cfg, c, f"memory plan: {c.job} on {c.model} ({cfg.num_hidden_layers} layers, hidden "
                                    f"{cfg.hidden_size}), {c.world} GPU(s)")
    print(text)


if __name__ == "__main__":
    run_cli(main)
