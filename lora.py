"""
LoRA (Hu et al. 2021), hand-written: low-rank adapters on chosen linear layers of a model whose base weights stay
frozen; switched off for PPO's reference policy, merged for sampling and for a plain checkpoint. And the helpers a
checkpoint of an FSDP-sharded model needs (full_tensor, reshard, plain_tensors).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) x A^T B^T. W and b are the base layer's own Parameters (frozen, in the base
    dtype, under the same names, so checkpoints map as before); A (r, in) and B (out, r) are fp32 and trainable.
    B starts at zero: a fresh adapter leaves the model unchanged. enabled=False is the base layer (PPO's
    reference policy is the policy with its adapters switched off)."""

    def __init__(self, base, rank, alpha, generator=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        A = torch.empty(rank, self.in_features)                                         # (r, in)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)               # as nn.Linear (and PEFT)
        self.lora_A = nn.Parameter(A.to(dev))                                           # (seeded on the CPU)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))    # (out, r)
        self.scale, self.enabled = alpha / rank, True
        self.merged = None                    # while the sampler runs (merged): W + (alpha / r) B A, or (A, s B) cast
        self.cast = None                      # once to the base's dtype

    def forward(self, x):
        if self.enabled and self.merged is not None:
            return F.linear(x, self.merged, self.bias)
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        if self.cast is not None:
            return y + F.linear(F.linear(x, self.cast[0]), self.cast[1])
        # in x's dtype (a bf16 base computes its adapters in bf16; the fp32 A and B get the gradients)
        return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def merged_weight(self):
        """W + (alpha / r) B A, summed in fp32, in W's dtype."""
        W, A, B = full_tensor(self.weight), full_tensor(self.lora_A), full_tensor(self.lora_B)
        return (W.float() + self.scale * (B.float() @ A.float())).to(W.dtype)


def add_lora(model, rank, alpha, targets=LORA_TARGETS, seed=0):
    """Freeze every parameter of `model` and put adapters of rank `rank` on the linear layers named in
    `targets` (attribute names: q_proj, ..., down_proj). Returns the adapters' parameters."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise UserError(f"--lora_targets: unknown layer(s) {', '.join(sorted(unknown))}; choose from "
                        f"{', '.join(LORA_TARGETS)}.")
    if rank <= 0:
        raise UserError(f"--lora_rank={rank}: a LoRA rank must be a positive integer (0 turns LoRA off).")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(mod, name, LoRALinear(child, rank, alpha, g))
    return [p for n, p in model.named_parameters() if ".lora_" in n]


class lora_disabled:
    """with lora_disabled(model): the base model (adapters off), e.g. PPO's reference policy."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]

    def __enter__(self):
        for m in self.layers:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.layers:
            m.enabled = True


@contextlib.contextmanager
def merged(model):
    """with merged(model): each enabled adapter prepared for no-grad forwards (the sampler's loop runs one a token;
    unmerged, every adapter adds two casts, two matmuls, a scale and an add). An fp32 layer gets a copy of its weight
    with the adapter folded in, W + (alpha / r) B A: a forward then costs what the plain model's costs. A layer in a
    lower precision keeps its adapter apart, cast and scaled once for the call: rounding W + (alpha / r) B A to bf16
    would erase most of a young adapter (at |BA| = 1e-3 |W|, 79% of it), and the sampler would draw from nearly the
    base policy while PPO's logprobs are the adapted one's. Dropped on leaving; training reaches A and B through the
    unmerged form. Under FSDP, enter it with the weights gathered (sample.gathered)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.enabled]
    for m in layers:
        if m.weight.dtype == torch.float32:
            m.merged = m.merged_weight()
        else:
            dtype = m.weight.dtype
            m.cast = full_tensor(m.lora_A).to(dtype), (full_tensor(m.lora_B) * m.scale).to(dtype)
    try:
        yield
    finally:
        for m in layers:
            m.merged = m.cast = None


def merge_lora(model):
    """Fold every adapter into its layer, in place: the model becomes a plain LLaMA (nn.Linear everywhere)."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")
                lin.weight = nn.Parameter(child.merged_weight(), requires_grad=False)
                lin.bias = child.bias
                setattr(mod, name, lin)
    return model


def full_tensor(t):
    """A parameter as a plain tensor: FSDP's sharded DTensors are gathered (every rank must call this)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reshard(module):
    """FSDP: the root module keeps its gathered bf16 compute copies after a forward; put the fp32 shards back."""
    for m in module.modules():
        if hasattr(m, "reshard"):
            m.reshard()


def plain_tensors(module):
    """The tensors of `module` as a plain checkpoint holds them, to be made one at a time: [(name, bytes, get)], where
    get() returns the tensor with its LoRA adapter merged (the adapters themselves are left out) and its FSDP shards
    gathered (a collective: every process calls each get, in this order). The sizes come from the shapes alone."""
    reshard(module)
    merged = {f"{n}.weight": m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    return [(n, p.numel() * p.element_size(), merged[n].merged_weight if n in merged else lambda p=p: full_tensor(p))
            for n, p in module.named_parameters() if ".lora_" not in n]
