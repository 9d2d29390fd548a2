"""memory.py: parameter counts, the activation plan against what autograd saves, the plans for 7B training and 30B
sampling, the allocation tracker, and the CLI and trainers' dry runs."""
import json
import subprocess
import sys

import pytest
import torch

import memory
from conftest import ROOT, saved_bytes, small_cfg
from lora import LORA_TARGETS, add_lora
from model import Llama


def test_parameter_counts_match_the_models_and_known_checkpoints():
    for kw in (dict(), dict(tie_word_embeddings=True, attention_bias=False), dict(mlp_bias=True)):
        cfg = small_cfg(**kw)
        assert memory.param_counts(cfg)[0] == sum(p.numel() for p in Llama(cfg).parameters())
        assert memory.param_counts(cfg, lm_head=False)[0] == \
            sum(p.numel() for p in Llama(cfg, lm_head=False).parameters()) + cfg.hidden_size
        m = Llama(cfg)
        n = sum(p.numel() for p in add_lora(m, 8, 16, ("q_proj", "o_proj", "up_proj")))
        assert memory.lora_params(cfg, 8, ("q_proj", "o_proj", "up_proj")) == n
    # the published sizes: Llama-2-7B 6,738,415,616 and Llama-2-70B 68,976,648,192 parameters
    assert memory.param_counts(memory.model_config("llama-2-7b"))[0] == 6_738_415_616
    assert memory.param_counts(memory.model_config("llama-2-70b"))[0] == 68_976_648_192
    # Qwen2.5 (q/k/v biases; 0.5B and 1.5B tie their heads) and Mistral-7B-v0.3, as their safetensors count them
    for shape, n in (("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512),
                     ("mistral-7b", 7_248_023_552)):
        assert memory.param_counts(memory.model_config(shape))[0] == n, shape


MODES = {   # name: (weights dtype, autocast, lora targets or None, residual bytes, compute bytes)
    "fp32 full": (torch.float32, False, None, 4, 4),
    "fp32 lora": (torch.float32, False, LORA_TARGETS, 4, 4),
    "bf16 autocast over fp32 masters": (torch.float32, True, None, 4, 2),
    "bf16 lora, frozen bf16 base": (torch.bfloat16, True, LORA_TARGETS, 2, 2),
    "bf16 lora q,v only": (torch.bfloat16, True, ("q_proj", "v_proj"), 2, 2),
    "bf16 weights (as FSDP computes)": (torch.bfloat16, False, None, 2, 2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_plan_equals_what_the_forward_saves(mode, ckpt):
    """memory.block_activation_bytes against the storages autograd really keeps, for a padded batch."""
    wdtype, amp, targets, rb, cb = MODES[mode]
    cfg = small_cfg(num_hidden_layers=3, attention_bias=False)
    torch.manual_seed(0)
    model = Llama(cfg, lm_head=False).init_weights().to(wdtype)
    rank = 0
    if targets:
        rank = 4
        add_lora(model, rank, 8, targets)
    model.grad_checkpointing = ckpt
    B, T = 3, 40
    idx = torch.randint(0, 96, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :7] = False
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def fwd():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model(idx, mask=mask, return_hidden=True, logits="none")[1]
    measured, _ = saved_bytes(fwd, params)
    L, C, tokens = cfg.num_hidden_layers, cfg.hidden_size, B * T
    trained = targets or LORA_TARGETS
    per_layer = memory.block_activation_bytes(cfg, cb, rb, trained, rank, seq=T)
    layers = L * rb * C * tokens if ckpt else L * per_layer * tokens
    # besides the blocks: the final norm (with LoRA, as large as the first block's norm, which saves nothing: its
    # input, a frozen embedding, needs no gradient), the bf16 copies autocast makes of fp32 trained matrices, RoPE's
    # cos / sin, the token ids (full fine-tuning: the embedding's gradient), the mask checkpointing keeps
    final_norm = (4 * C + 4 + (rb * C if not targets else 0)) * tokens if not targets or ckpt else 0
    copies = 2 * memory.param_counts(cfg, lm_head=False)[1] if (amp and not targets and not ckpt) else 0
    copies += 2 * memory.lora_params(cfg, rank, targets) if (amp and targets and not ckpt) else 0
    small = (2 * cfg.head_dim * rb + (8 if not targets else 0) + (T if ckpt else 0)) * tokens
    assert measured == pytest.approx(layers + final_norm + copies + small, rel=0.02)


def test_plans_for_llama_2_7b_on_one_80gb_gpu():
    cfg = memory.model_config("llama-2-7b")
    GiB = memory.GiB
    rows, peak, _ = memory.plan(cfg, memory.Job(job="rm", rows=16, seq=1024))
    r = dict(rows)
    assert r["model weights (fp32 masters)"] == 4 * (6_738_415_616 - 32000 * 4096 + 4096)
    assert r["model AdamW moments (fp32)"] == 2 * r["[train] gradients (fp32)"] == 2 * r["model weights (fp32 masters)"]
    assert peak > 80 * GiB                                                 # full fine-tuning does not fit
    _, lora_peak, _ = memory.plan(cfg, memory.Job(job="rm", rows=16, seq=1024, lora_rank=16, grad_checkpointing=True))
    assert 12 * GiB < lora_peak < 40 * GiB                                 # frozen bf16 base (12.3 GiB) + a little
    rows, ppo_peak, note = memory.plan(cfg, memory.Job(job="ppo", rows=8, seq=768, response=256, rollout_rows=64,
                                                       lora_rank=16, grad_checkpointing=True))
    assert ppo_peak < 80 * GiB and "adapters off" in note
    assert not any("reference" in n for n, _ in rows)                     # no copy of the reference or the RM
    rows, _, _ = memory.plan(cfg, memory.Job(job="ppo", dtype="fp32", rows=8, seq=768, response=256, rollout_rows=64,
                                             lora_rank=16, grad_checkpointing=True))
    assert dict(rows)["[rollout] LoRA adapters merged into copies of their fp32 layers (lora.merged)"] == \
        4 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)                     # fp32 layers sample merged
    rows, fsdp_peak, _ = memory.plan(cfg, memory.Job(job="rm", rows=4, seq=1024, world=8, fsdp=True,
                                                     grad_checkpointing=True))
    assert dict(rows)["model AdamW moments (fp32)"] == pytest.approx(8 * (6_738_415_616 - 32000 * 4096 + 4096) / 8)
    assert fsdp_peak < 80 * GiB                                            # full fine-tuning over 8 GPUs


def test_sampling_plan_of_a_30b_generator():
    """A LLaMA-30B generator in bf16: about 60 GiB of weights and 1.5 MiB of KV cache a token, so 32 rows of its
    2,048-token context do not fit an 80 GB GPU; the plan says the largest batch that does, and that batch fits."""
    GiB = memory.GiB
    cfg = memory.model_config("llama-30b")
    assert memory.param_counts(cfg)[0] == pytest.approx(32.5e9, rel=2e-3)   # LLaMA-30B: 32.5B parameters
    rows, peak, _ = memory.plan(cfg, memory.Job(job="sample", rows=32, seq=2048))
    rows = dict(rows)
    assert rows["weights"] / GiB == pytest.approx(60.6, abs=0.1)
    assert rows["KV cache (32 rows x 2048 tokens)"] / (32 * 2048) / 2**20 == pytest.approx(1.52, abs=0.01)
    assert peak > 80 * GiB
    k = memory.largest_batch(cfg, memory.Job(job="sample", rows=32, seq=2048))
    assert k == 5
    assert memory.plan(cfg, memory.Job(job="sample", rows=k, seq=2048))[1] <= 80 * GiB
    assert memory.plan(cfg, memory.Job(job="sample", rows=k + 1, seq=2048))[1] > 80 * GiB
    text, fits = memory.describe_plan(cfg, memory.Job(job="sample", rows=32, seq=2048))
    assert not fits and "the largest batch that fits: 5 rows of 2048 tokens" in text


def test_sampling_plan_counts_a_shared_prefix_once():
    """A few-shot prefix every row shares is cached once (sample.generate), so the KV cache is the prefix plus each
    row's own tokens, and the prefix's attention scores are bounded by the chunking in model.attention_with_lse."""
    cfg = memory.model_config("llama-30b")
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2      # bf16 bytes a token
    rows = dict(memory.plan(cfg, memory.Job(job="sample", rows=32, seq=2048, shared=1800))[0])
    assert rows["KV cache of the shared prefix (1800 tokens, once)"] == kv_token * 1800
    assert rows["KV cache (32 rows x 248 tokens of their own)"] == kv_token * 32 * 248
    assert rows["prefill: the rows' scores against the prefix (fp32, in chunks)"] <= 2**28 + 8 * 52 * 1800
    k = memory.largest_batch(cfg, memory.Job(job="sample", rows=32, seq=2048, shared=1800))
    assert k > 5 * memory.largest_batch(cfg, memory.Job(job="sample", rows=32, seq=2048))


def test_the_allocation_tracker_counts_each_live_storage_once():
    """memory.AllocationTracker: a storage counts once however many views share it, from its making to the death of
    its last reference; what autograd saves counts until backward frees it; a storage resized in place (FSDP frees its
    gathered weights so) counts at its new size; the peak is the most at once."""
    from memory import AllocationTracker
    with AllocationTracker() as t:
        a = torch.zeros(1000)
        views = a[10:], a.view(10, 100), a.t() if a.dim() == 2 else a[::2]
        assert t.live == t.peak == 4000
        b = a + 1
        assert t.live == 8000
        del b, views
        assert t.live == 4000 and t.peak == 8000
        x = torch.randn(100, 100, requires_grad=True)
        y = x.exp()                                   # saved for backward: exp keeps its output
        z = y.sum()
        del y
        assert t.live == 4000 + 80000 + 4
        z.backward()
        assert t.live == 4000 + 40000 + 4 + 40000     # y freed; x.grad made
        a.untyped_storage().resize_(0)
        assert t.live == 80004
    del a


@pytest.mark.slow
def test_memory_cli_and_trainer_dry_runs_print_a_plan():
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, cwd=ROOT, timeout=120)  # noqa
    r = run("memory.py", "--model=llama-2-7b", "--job=rm")
    assert r.returncode == 0 and "does NOT fit in 80 GiB" in r.stdout, r.stderr
    r = run("rm.py", "--model=llama-2-7b", "--dry_run=true", "--lora_rank=16", "--device=cuda",
            "--grad_checkpointing=true")
    assert r.returncode == 0 and "fits in 80 GiB" in r.stdout and "adapters + head" in r.stdout, r.stderr
    r = run("ppo.py", "--policy=llama-2-7b", "--dry_run=true", "--lora_rank=16", "--grad_checkpointing=true",
            "--device=cuda", "--gpu_gib=40")
    assert r.returncode == 0 and "[rollout] KV cache" in r.stdout and "40 GiB" in r.stdout, r.stderr
    r = run("memory.py", "--model=nope")
    assert r.returncode == 2 and "known shape" in r.stderr
    # the plan held against real allocations: every job at the tiny shape, the paper's settings and a CPU run's (every
    # weight trained, or LoRA)
    r = run("memory.py", "--check=tiny")
    cases = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and len(cases) == 14, r.stderr
    assert {(c["job"], c["settings"]) for c in cases} == {(j, s) for j in ("rm", "sft", "dpo", "ppo", "sample")
                                                          for s in ("paper", "full", "lora") if (j, s) != ("sample", "lora")}
    assert all(0.85 <= c["planned_bytes"] / c["measured_bytes"] <= 1.15 for c in cases), cases
    assert run("memory.py", "--check=huge").returncode == 2
    r = run("dpo.py", "--policy=llama-2-7b", "--dry_run=true", "--lora_rank=16", "--grad_checkpointing=true",
            "--device=cuda")
    assert r.returncode == 0 and "memory plan (dpo," in r.stdout and "fits in 80 GiB" in r.stdout, r.stderr
    r = run("almost.py", "--dry_run=true", "--stages=rm,sft,ppo,dpo")
    assert r.returncode == 0 and all(f"memory plan ({j}," in r.stdout for j in ("rm", "sft", "ppo", "dpo")), r.stderr
