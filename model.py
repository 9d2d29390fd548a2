"""
The LLaMA-family decoder (LLaMA 1-3, Qwen2 / Qwen2.5, Mistral) and its HF-format checkpoints (LoRA adapters are in
lora.py).

One forward serves training, prefill and cached decoding:

    logits = model(idx)                                   # (B, T) -> (B, T, V) fp32
    logits = model(idx, mask=mask, cache=cache)           # left-padded batch, KV cache
    logits, h = model(idx, mask=mask, return_hidden=True) # h feeds the reward / value heads

Module names follow transformers' LlamaForCausalLM (Qwen2's and Mistral's are the same), so a checkpoint's tensor
names map onto ours by one rule (`hf_name` below) and any such HF folder loads without conversion. RoPE uses HF's
rotate-half layout.
"""
import contextlib
import gc
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import UserError, commit_dir, rank, read_json, tmp_dir, write_json
from lora import full_tensor, plain_tensors
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# config: the fields of HF's LlamaConfig that change the computation

FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}   # model_type -> its architectures' prefix


@dataclass
class LlamaConfig:
    """A LLaMA-family decoder: LLaMA 1-3, and Qwen2 / Qwen2.5 (a bias on q, k and v) and Mistral (an optional sliding
    window), which differ from it in nothing else this code computes."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None       # None: = num_attention_heads (MHA); 1 is MQA; in between is GQA
    head_dim: int = None                  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None             # None, {"rope_type": "linear", "factor"} or llama3's five keys
    attention_bias: bool = False          # a bias on q, k, v and o (LLaMA's option)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: object = 2              # an int or a list of ints
    pad_token_id: int = None
    model_type: str = "llama"             # llama, qwen2 (q, k and v always have a bias) or mistral
    window: int = None                    # the sliding window attention keeps to (Mistral's sliding_window, Qwen2's
                                          # when use_sliding_window), None: none; not a config.json key
    extra: dict = field(default_factory=dict)  # other keys of config.json, written back unchanged on save

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self):
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def context(self):
        """The longest sequence this code computes as the model does: the context window, or the sliding window when
        it is shorter (a window at least as long as every sequence changes nothing; sliding-window attention itself is
        not written, so no sequence may pass it)."""
        return min(self.max_position_embeddings, self.window or self.max_position_embeddings)

    def context_note(self):
        """How the context window is named in a message."""
        return f"the sliding window of {self.window} tokens (config.json: sliding_window; sliding-window attention is " \
               f"not written here)" if self.context < self.max_position_embeddings else \
            f"the context window of {self.context} tokens"

    @classmethod
    def from_dict(cls, d, where="config.json"):
        d = dict(d)
        arch = d.get("architectures") or []
        family = d.get("model_type")
        if family not in FAMILIES or any(not a.startswith(FAMILIES[family]) for a in arch):
            raise UserError(f"{where}: model_type={family!r}, architectures={arch}: not a LLaMA, Qwen2 or Mistral "
                            f"model. Point --model at a folder holding a LlamaForCausalLM, Qwen2ForCausalLM or "
                            f"MistralForCausalLM checkpoint (or a ...ForSequenceClassification one).")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: hidden_act={d['hidden_act']!r}; the LLaMA family uses 'silu'.")
        # transformers >= 5 writes rope_theta and the scaling together as "rope_parameters"
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                d.setdefault("rope_scaling", rp)
        names = {f.name for f in fields(cls)} - {"extra", "window"}
        kw = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(kw.get(k), int) or kw[k] <= 0:
                raise UserError(f"{where}: '{k}' is missing or not a positive integer (got {kw.get(k)!r}).")
        # Mistral's window applies to every layer; Qwen2's only with use_sliding_window (off in the released configs)
        # and then to the layers from max_window_layers on: either way no sequence may pass it (context)
        window = d.get("sliding_window") if family == "mistral" or d.get("use_sliding_window") else None
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise UserError(f"{where}: sliding_window={window!r} is not a positive integer.")
        cfg = cls(**kw, window=window, extra=extra)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise UserError(f"{where}: num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={cfg.num_key_value_heads}.")
        if cfg.head_dim % 2:
            raise UserError(f"{where}: head_dim={cfg.head_dim} must be even for RoPE.")
        rope_type = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UserError(f"{where}: rope_scaling type {rope_type!r} is not supported "
                            f"(supported: none, 'linear', 'llama3').")
        return cfg

    def to_dict(self):
        """config.json: the keys read, and every other key as it was."""
        d = {"architectures": [FAMILIES[self.model_type] + "ForCausalLM"], "hidden_act": "silu"}
        d.update(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "window")})
        return d

    @property
    def eos_ids(self):
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)


# -----------------------------------------------------------------------------
# the transformer

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight, normalised in fp32 whatever the dtype, as HF does (a bf16
        # variance is too coarse); F.rms_norm is that formula in one kernel
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg):
    """Inverse frequencies (head_dim/2,) of RoPE, with linear or Llama-3 scaling when the config asks."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


MASKED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(device_type, masked):
    """The attention kernels a forward may use: on a GPU with an explicit mask, every one but cuDNN's. With the pinned
    torch 2.13, cuDNN's SDPA backward returns NaN in dQ on H100 / H200 when a mask is passed, the sequence length is
    64 mod 128 and a row's log-sum-exp is below about -88.7 (pytorch/pytorch#196678, a regression since 2.11; TRL's
    DPO on Qwen2.5 went NaN from it, huggingface/trl#7181); PyTorch puts cuDNN first on those GPUs. A padded RM or
    PPO forward passes a mask, so it runs the memory-efficient kernel instead; causal attention without a mask
    (SFT's right-padded rows, a decode step without padding) keeps PyTorch's choice."""
    return sdpa_kernel(MASKED_SDPA) if masked and device_type == "cuda" else contextlib.nullcontext()


def attention(q, k, v, attn_mask):
    """Softmax attention of q (B, nh, T, hd) over k and v (B, nkv, S, hd) -> (B, nh, T, hd): under attn_mask (B, 1, T,
    S) where one is given, else causal over the T queries (one query sees every key). GQA: query head h reads kv head
    h // (nh / nkv), as HF's repeat_kv does."""
    with attention_kernels(q.device.type, attn_mask is not None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and q.shape[2] > 1,
                                              enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, b = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * self.hd, bias=b)
        self.k_proj = nn.Linear(C, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(C, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.hd, C, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, attn_mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        q = q * cos + q.roll(self.hd // 2, -1) * sin                           # RoPE, see Llama.rope
        k = k * cos + k.roll(self.hd // 2, -1) * sin
        # with a cache, the new keys and values join the earlier ones, and the queries attend over them all
        y = attention(q, k, v, attn_mask) if cache is None else cache.attend(layer, q, k, v, attn_mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)           # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=b)
        self.up_proj = nn.Linear(C, H, bias=b)
        self.down_proj = nn.Linear(H, C, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def last_token_index(mask):
    """(B, T) bool mask of real tokens -> (B,) index of each row's last real token, for left or right
    padding alike. The reward score, PPO's reward placement and the value bootstrap all read this token."""
    T = mask.shape[-1]
    return (mask.long() * torch.arange(1, T + 1, device=mask.device)).argmax(-1)


PAD_ID = 0  # any id works: padded slots are masked out of attention and never sampled or scored


def pad_batch(seqs, left=True, device="cpu"):
    """list of id lists -> (B, T) ids and (B, T) bool mask (False at padding), padded on the left (or right)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        idx[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = True
    return idx.to(device), mask.to(device)


class KVCache:
    """Preallocated keys and values for `max_len` slots. Slots fill left to right for every row at once;
    `mask` marks which slots hold real tokens (left padding does not), `lengths` counts them per row, so the
    next token's RoPE position is lengths[b] whatever the padding."""
    shared = 0                                # tokens of a prefix every row shares (SharedPrefixCache, below)

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len, self.pos = max_len, 0   # pos: slots filled so far
        self.padded = False                   # True once any slot is padding: attention then needs the mask

    def add(self, T, mask):
        """Slots for the next T tokens, mask (B, T) marking the real ones (None: all of them) -> (which slots so far are
        real (B, S), whether any is padding, each row's real tokens before these (B, 1): the first new position). The
        forward's layers then write these slots (attend). Without padding no value is read on the host: a decode step
        needs no sync."""
        self.mask[:, self.pos:self.pos + T] = True if mask is None else mask
        self.padded = self.padded or (mask is not None and not bool(mask.all()))
        start = self.lengths[:, None]
        self.pos += T
        self.lengths = self.lengths + (T if mask is None else mask.sum(-1))
        return self.mask[:, :self.pos], self.padded, start

    def attend(self, layer, q, k, v, attn_mask):
        """The layer's keys and values k, v (B, nkv, T, hd) into the slots add made; q attends over every slot so far."""
        T = k.shape[2]
        self.k[layer][:, :, self.pos - T:self.pos] = k
        self.v[layer][:, :, self.pos - T:self.pos] = v
        return attention(q, self.k[layer][:, :, :self.pos], self.v[layer][:, :, :self.pos], attn_mask)

    def keep(self, rows):
        """Keep only the batch rows `rows` (a (b,) index): rows that finished leave the batch. One layer at a time, so
        the copy in flight is one layer's kept rows (1 / num_hidden_layers of the cache at most)."""
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer][rows]
            self.v[layer] = self.v[layer][rows]
        self.mask, self.lengths = self.mask[rows], self.lengths[rows]


def hf_name(name):
    """Our parameter name -> the tensor name in an HF LlamaForCausalLM checkpoint."""
    return name if name.startswith("lm_head.") else "model." + name


class Llama(nn.Module):
    def __init__(self, cfg, lm_head=True):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # lm_head=False: a trunk for the reward / value heads, without the (vocab, hidden) output matrix
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if lm_head else None
        if lm_head and cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.eos_ids = cfg.eos_ids  # stop ids for sampling; from_pretrained prefers generation_config.json
        self.grad_checkpointing = False   # True: keep only each block's input, recompute the rest in backward

    def _apply(self, fn, recurse=True):
        """.to(dtype) casts floating buffers too; RoPE's inverse frequencies stay fp32 (a bf16 copy rotates every
        position by a wrong angle), recomputed from the config on the buffer's new device."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def init_weights(self, std=0.02):
        """Random init as HF does (normal(0, std), zero biases, unit norms); for tests and benchmarks."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        return self

    def new_cache(self, batch_size, max_len, prefix=None):
        """A KV cache of batch_size rows x max_len slots; prefix: a filled one-row cache every row continues."""
        P = prefix.pos if prefix is not None else 0
        if P + max_len > self.config.context:
            raise ValueError(f"a KV cache of {P} + {max_len} slots is past {self.config.context_note()}")
        p = self.embed_tokens.weight
        dtype = p.dtype
        if torch.is_autocast_enabled(p.device.type):   # fp32 master weights computing in bf16: a bf16 cache
            dtype = torch.get_autocast_dtype(p.device.type)
        if prefix is not None:
            return SharedPrefixCache(self.config, batch_size, max_len, p.device, dtype, prefix)
        return KVCache(self.config, batch_size, max_len, p.device, dtype)

    def forward(self, idx, positions=None, mask=None, cache=None, return_hidden=False, logits="all"):
        """
        idx:       (B, T) token ids
        positions: (B, T) RoPE positions; by default the count of real tokens before each one, so a left-padded
                   row sees the positions it would see alone
        mask:      (B, T) bool, False at padding (None: no padding). Keys at padding are never attended to.
        cache:     a KVCache: the T tokens go into its next T slots and attend to everything before them
        logits:    "all" (B, T, V), "last" (B, 1, V), "none", or a slice of the positions (B, T', V): only those
                   positions go through the head (PPO's response tokens, say); always fp32
        returns logits, or (logits, hidden) with hidden (B, T, C) the final-norm states (as HF's last_hidden_state)
        """
        positions, attn_mask = self.positions_and_mask(idx, positions, mask, cache)  # (B, T), (B, 1, T, S) or None
        x = self.embed_tokens(idx)                                              # (B, T, C)
        cos, sin = self.rope(positions, x.dtype)                                # (B, 1, T, hd) each
        checkpoint = self.grad_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if checkpoint:   # gradient checkpointing: the block's inner activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn_mask, None, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, cache, i)
        h = self.norm(x)                                                        # (B, T, C)
        if isinstance(logits, str) and logits == "none" or self.lm_head is None:
            out = None
        else:
            at = {"all": slice(None), "last": slice(-1, None)}.get(logits, logits) if isinstance(logits, str) else logits
            out = self.lm_head(h[:, at]).float()                                 # (B, T', V)
        return (out, h) if return_hidden else out

    def positions_and_mask(self, idx, positions, mask, cache):
        """The RoPE positions (B, T) of a forward's tokens and its attention mask (B, 1, T, S), or None where plain
        causal attention (or none, a padding-free decode step) is right; with a cache, takes the tokens' slots in it (KVCache.add)."""
        B, T = idx.shape
        dev = idx.device
        past = cache.pos if cache is not None else 0
        if past + T > (cache.max_len if cache is not None else self.config.context):
            raise ValueError(f"{past} + {T} tokens do not fit the KV cache or {self.config.context_note()}")
        # which keys are real: mask None means no padding, and then the decode path needs no host sync
        if cache is not None:
            key_mask, padded, start = cache.add(T, mask)                       # (B, S), bool, (B, 1)
        else:
            key_mask, padded, start = mask, mask is not None and not bool(mask.all()), 0
        if positions is None:
            if mask is None:
                positions = start + torch.arange(T, device=dev)[None]            # (B or 1, T)
            else:
                positions = (start + mask.long().cumsum(-1) - 1).clamp(min=0)   # (B, T)
        elif int(positions.max()) >= self.config.context:
            raise ValueError(f"position {int(positions.max())} is past {self.config.context_note()}")
        # causal AND key is real. Each query also sees itself, so the rows of padding queries are never empty (their
        # outputs are junk that nothing reads, but finite).
        attn_mask = None
        if padded and T == 1 and mask is None:
            attn_mask = key_mask[:, None, None, :]     # a decode step: the new token sees every real key
        elif padded or (T > 1 and (past > 0 or (cache is not None and cache.shared))):
            S = past + T
            qi = torch.arange(past, S, device=dev)[:, None]
            kj = torch.arange(S, device=dev)[None, :]
            attn_mask = ((kj <= qi) & key_mask[:, None, :]) | (kj == qi)       # (B, T, S)
            attn_mask = attn_mask[:, None]                                      # (B, 1, T, S)
        return positions, attn_mask

    def rope(self, positions, dtype):
        """RoPE's cos and sin (B, 1, T, hd), computed in fp32 like HF and shared by all layers. HF rotates halves:
        x*cos + cat(-x2, x1)*sin; we fold the minus sign into sin so the rotation is a roll: x*cos + cat(x2, x1)*sin"""
        freqs = positions[..., None].float() * self.inv_freq                    # (B, T, hd/2)
        c, s = freqs.cos(), freqs.sin()
        return torch.cat((c, c), -1)[:, None].to(dtype), torch.cat((-s, s), -1)[:, None].to(dtype)

    # -------------------------------------------------------------------------
    # HF-format checkpoints

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, lm_head=True, extra=None):
        """Load an HF folder of the LLaMA family (Llama, Qwen2, Mistral ...ForCausalLM, or a reward model's
        ...ForSequenceClassification): config.json + model.safetensors or a sharded index.
        The model is built on the meta device and the checkpoint's tensors are assigned into it, so the
        weights are in memory once. dtype None: fp32 on CPU, bf16 on CUDA.
        lm_head=False loads the trunk only (a stored lm_head.weight is skipped).
        extra: {name: shape} of further tensors to take from the checkpoint if it has them (a reward head,
        say), read in fp32; they land in model.extra_tensors."""
        cfg = load_config(path)
        device = torch.device(device)
        if dtype is None:
            dtype = default_dtype(device)
        with torch.device("meta"):
            model = cls(cfg, lm_head=lm_head)
        expected = {hf_name(n): p.shape for n, p in model.named_parameters()}  # tied: lm_head is not listed
        state = load_safetensors(path, expected, device, dtype, optional=extra or {})
        model.load_state_dict({n: state.pop(hf_name(n)) for n, _ in model.named_parameters()},
                              strict=False, assign=True)
        model.extra_tensors = state
        if lm_head and cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)
        model.eos_ids = generation_eos_ids(path) or cfg.eos_ids
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=5 * 10**9, extra=None, config_updates=None, files=None):
        """Write config.json (+ generation_config.json) and safetensors in HF's layout: model.safetensors, or shards
        model-0000N-of-0000M.safetensors of at most max_shard_bytes with model.safetensors.index.json. LoRA adapters
        are merged into their layers (a plain LLaMA checkpoint) and FSDP shards gathered, one tensor at a time: each
        is moved to the host and the device copy dropped before the next is made, and the host holds one shard at
        most. Under FSDP every process calls this (each gather is a collective); process 0 alone keeps and writes.
        Written into a temporary folder, then renamed: a crash never leaves half a checkpoint under `path`.
        extra: {name: tensor} saved beside the weights (a reward head, say); config_updates: keys to set in
        config.json; files: {name: writer(full_path)} for more files (trainer state, say) that must land in the same
        atomic step."""
        entries = [(hf_name(n), size, get) for n, size, get in plain_tensors(self)]
        entries += [(n, t.numel() * t.element_size(), lambda t=t: full_tensor(t)) for n, t in (extra or {}).items()]
        shards = [[]]
        for e in entries:                                      # fill each shard up to max_shard_bytes
            if shards[-1] and sum(s for _, s, _ in shards[-1]) + e[1] > max_shard_bytes:
                shards.append([])
            shards[-1].append(e)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        master = rank() == 0
        tmp = tmp_dir(path) if master else None
        from safetensors.torch import save_file
        for fname, shard in zip(names, shards):
            host = {}
            for name, _, get in shard:
                t = get()                                      # one gathered / merged tensor on the device
                if master:
                    host[name] = t.to("cpu").contiguous()
                del t
            if master:
                save_file(host, os.path.join(tmp, fname), metadata={"format": "pt"})
            del host
        if not master:
            return
        if len(shards) > 1:
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": sum(s for _, s, _ in entries)},
                        "weight_map": {n: f for f, shard in zip(names, shards) for n, _, _ in shard}})
        d = self.config.to_dict()
        d["torch_dtype"] = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        d.update(config_updates or {})
        write_json(os.path.join(tmp, "config.json"), d)
        for name, write in (files or {}).items():
            write(os.path.join(tmp, name))
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.eos_ids}
        if self.config.pad_token_id is not None:
            gen["pad_token_id"] = self.config.pad_token_id
        write_json(os.path.join(tmp, "generation_config.json"), gen)
        commit_dir(tmp, path)


# -----------------------------------------------------------------------------
# prompt-prefix sharing, plugged into the forward through its KV cache: the prefix's keys and values are kept once
# for the batch, and attention over them is merged with each row's own (cascade attention)

SCORES_BYTES = 2**28   # attention_with_lse works through the queries in chunks whose fp32 scores fit in this


def attention_with_lse(q, k, v, mask=None):
    """Softmax attention that also returns the log-sum-exp of each query's scores, so that attention over two key
    sets can be merged. q (..., M, hd), k and v (..., S, hd), mask (bool, (..., M, S) or broadcast to it) or None
    -> out (..., M, hd), lse (..., M) fp32. Scores and softmax in fp32, SCORES_BYTES of them at a time: a long
    prefill against a long prefix would otherwise hold every score at once."""
    M, S = q.shape[-2], k.shape[-2]
    step = max(1, SCORES_BYTES // (8 * S * q[..., 0, 0].numel()))            # query rows a chunk
    if M > step:
        rows = lambda i: mask if mask is None or mask.shape[-2] == 1 else mask[..., i:i + step, :]
        parts = [attention_with_lse(q[..., i:i + step, :], k, v, rows(i)) for i in range(0, M, step)]
        return torch.cat([o for o, _ in parts], -2), torch.cat([lse for _, lse in parts], -1)
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5              # (..., M, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1)                                                     # (..., M)
    return (s - lse[..., None]).exp().to(v.dtype) @ v, lse


def cascade_attention(q, pk, pv, k, v, attn_mask):
    """Attention over a prompt prefix that all B rows share, then each row's own keys, merged exactly (Hydragen,
    Juravsky et al. 2024; FlashInfer's cascade attention). The prefix's keys are read once for the whole batch:
    its part is one matmul whose rows are every query of every row, instead of B copies of the prefix in the cache.
    q (B, nh, T, hd); pk, pv (1, nkv, P, hd), the prefix; k, v (B, nkv, S, hd), each row's own slots;
    attn_mask: (B, 1, T, S) bool or None (every own key visible) -> (B, nh, T, hd)."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv                                              # GQA: query heads kv*g .. kv*g+g-1 read kv head kv
    qg = q.reshape(B, nkv, g * T, hd)                                         # (B, nkv, g*T, hd)
    # 1) the shared prefix: every query of the batch in one matmul a kv head (no mask: the prefix comes first)
    op, lp = attention_with_lse(qg.transpose(0, 1).reshape(1, nkv, B * g * T, hd), pk, pv)
    op = op.view(nkv, B, g * T, hd).transpose(0, 1)                           # (B, nkv, g*T, hd)
    lp = lp.view(nkv, B, g * T).transpose(0, 1)                               # (B, nkv, g*T)
    # 2) each row's own keys, under its mask (causal, padding)
    mask = None if attn_mask is None else attn_mask[:, :, None].expand(B, 1, g, T, -1).reshape(B, 1, g * T, -1)
    os_, ls = attention_with_lse(qg, k, v, mask)
    # 3) softmax over the union = each part weighted by its share of the total exp-sum: sigmoid(lse_a - lse_b)
    w = torch.sigmoid(lp - ls)[..., None]                                     # (B, nkv, g*T, 1)
    y = op.float() * w + os_.float() * (1 - w)
    return y.to(q.dtype).reshape(B, nh, T, hd)


class SharedPrefixCache(KVCache):
    """A KV cache whose rows all continue one prompt prefix, `prefix` (a filled one-row KVCache): its keys and values
    are kept once (not copied into each row), attention reads them through cascade_attention, and each row's
    positions continue after them. Its own slots hold each row's tokens after the prefix."""

    def __init__(self, cfg, batch_size, max_len, device, dtype, prefix):
        super().__init__(cfg, batch_size, max_len, device, dtype)
        self.shared = prefix.pos
        self.prefix_k = [k[:, :, :prefix.pos] for k in prefix.k]          # (1, nkv, P, hd) a layer
        self.prefix_v = [v[:, :, :prefix.pos] for v in prefix.v]
        self.lengths += prefix.pos

    def attend(self, layer, q, k, v, attn_mask):
        T = k.shape[2]
        self.k[layer][:, :, self.pos - T:self.pos] = k
        self.v[layer][:, :, self.pos - T:self.pos] = v
        return cascade_attention(q, self.prefix_k[layer], self.prefix_v[layer], self.k[layer][:, :, :self.pos],
                                 self.v[layer][:, :, :self.pos], attn_mask)


# -----------------------------------------------------------------------------
# loading helpers: one loader for configs, tensors and tokenizers

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _need_dir(path):
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such model folder. Pass a folder holding config.json and "
                        f"model.safetensors (an HF checkpoint of the LLaMA family), e.g. --model=data/stories260K.")


def load_config(path):
    _need_dir(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{cfg_path}: missing. A model folder needs the config.json of an HF checkpoint.")
    return LlamaConfig.from_dict(read_json(cfg_path), where=cfg_path)


def generation_eos_ids(path):
    """The stop ids of generation_config.json, if the folder has one (HF's generate() uses these)."""
    p = os.path.join(path, "generation_config.json")
    if not os.path.isfile(p):
        return None
    e = read_json(p).get("eos_token_id")
    return None if e is None else [e] if isinstance(e, int) else list(e)


def tensor_names(path):
    """The names of the tensors in a folder's safetensors checkpoint (headers only; no weight is read)."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return set((read_json(index).get("weight_map") or {}).keys())
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        return set()
    try:
        with safe_open(single, framework="pt", device="cpu") as f:
            return set(f.keys())
    except Exception as e:
        raise UserError(f"{single}: not a readable safetensors file ({e}). Re-download it.") from None


def load_safetensors(path, expected, device, dtype, optional=None):
    """Read the checkpoint's tensors, one file at a time, checking names and shapes against `expected`
    (all required) and `optional` (taken when present). Floating tensors are cast to `dtype`; optional ones (a
    reward model's head) are read in fp32."""
    optional = optional or {}
    from safetensors import safe_open
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        weight_map = read_json(index).get("weight_map") or {}
        files = [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not os.path.isfile(f):
                raise UserError(f"{f}: missing, but {index} lists it. Download every shard of the checkpoint.")
    else:
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json. Only safetensors "
                        f"checkpoints load (never pickles); convert .bin/.pth weights with transformers first.")
    state, where = {}, {}
    # tensors HF itself ignores: the RoPE buffer of old checkpoints; an lm_head that is tied, or not wanted
    # (a trunk for a reward model); a sequence classifier's head when loading a causal LM
    ignored = ("rotary_emb.inv_freq",) + tuple(n for n in ("lm_head.weight", "score.weight")
                                               if n not in expected and n not in optional)
    for f in files:
        try:
            handle = safe_open(f, framework="pt", device="cpu")
        except Exception as e:
            raise UserError(f"{f}: not a readable safetensors file ({e}). Re-download it.") from None
        with handle:
            for name in handle.keys():
                if name.endswith(ignored):
                    continue
                want = expected.get(name, optional.get(name))
                if want is None:
                    raise UserError(f"{f}: unexpected tensor '{name}' for this config.json. The weights do not "
                                    f"belong to this config (or are not a ...ForCausalLM).")
                t = handle.get_tensor(name)
                if tuple(t.shape) != tuple(want):
                    raise UserError(f"{f}: tensor '{name}' has shape {tuple(t.shape)}, config.json implies "
                                    f"{tuple(want)}. The weights and config.json do not match.")
                want_dtype = (torch.float32 if name not in expected else dtype) if t.is_floating_point() else t.dtype
                state[name] = t.to(device=device, dtype=want_dtype)
                where[name] = f
    missing = [n for n in expected if n not in state]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. "
                        f"'{missing[0]}'. The checkpoint is incomplete or belongs to another config.")
    return state


def load_tokenizer(path, config):
    """The tokenizer of a model folder, checked against the model's config."""
    tok = Tokenizer(path)
    if tok.vocab_size > config.vocab_size:
        raise UserError(f"{tok.path}: the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
                        f"{config.vocab_size}. Use the tokenizer that came with this checkpoint.")
    return tok


def free_memory():
    """Give back what the caller has let go of (the previous generator or policy of a stage, set to None before the next
    loads): collect it now and empty the CUDA cache, so the next model loads into the room the last one left."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load(path, device="cpu", dtype=None):
    """The model and tokenizer of a folder, checked against each other. Every script loads through here."""
    model = Llama.from_pretrained(path, device=device, dtype=dtype)
    return model, load_tokenizer(path, model.config)
