"""Scale: LoRA, gradient checkpointing, bf16 autocast over fp32 masters, the memory plan, and torchrun (DDP and
FSDP over 2 gloo processes on the CPU, compared with one process on the same global batch)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES, eos_prone_policy, toy_pairs, write_jsonl
from lora import LORA_TARGETS, LoRALinear, add_lora, lora_disabled, merge_lora, plain_tensors
from model import Llama, LlamaConfig, UserError

import memory


def small_cfg(**kw):
    d = dict(vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
             attention_bias=True)
    d.update(kw)
    return LlamaConfig.from_dict({"model_type": "llama", **d})


# -----------------------------------------------------------------------------
# LoRA

@pytest.mark.slow
def test_lora_starts_at_the_base_switches_off_and_merges_into_a_plain_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Llama(small_cfg()).init_weights()
    idx = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        base = model(idx)
    adapters = add_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    assert sum(p.numel() for p in adapters) == 2 * (4 * (48 + 64) + 4 * (48 + 32) + 4 * (112 + 48))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
    with torch.no_grad():
        assert torch.equal(model(idx), base)                              # B = 0: the base model
        for p in adapters:
            p.normal_(std=0.05)
        tuned = model(idx)
        assert (tuned - base).abs().max() > 1e-3
        with lora_disabled(model):
            assert torch.equal(model(idx), base)                          # adapters off: exactly the base
        assert torch.equal(model(idx), tuned)                             # and back on
    model.save_pretrained(tmp_path / "merged")
    names = json.load(open(tmp_path / "merged" / "config.json"))
    assert names["num_hidden_layers"] == 2
    from safetensors.torch import load_file
    assert not any("lora" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    again = Llama.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        assert (again(idx) - tuned).abs().max().item() < 1e-5
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(idx).logits - tuned).abs().max().item() < 1e-4        # transformers reads the merged model
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert (model(idx) - tuned).abs().max().item() < 1e-5


@pytest.mark.slow
def test_lora_checkpoints_load_in_peft(tmp_path):
    """A LoRA run's checkpoint holds its adapters in PEFT's layout: peft.PeftModel.from_pretrained on the base model
    gives our scores (a reward model: adapters + head) and our logits (a policy)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from rm import RewardModel, TrainConfig, train
    from trainer import save_training_checkpoint
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(40))
    train(TrainConfig(data=data, preset="tiny", out=str(tmp_path / "rm"), batch_size=8, micro_batch=4, epochs=0.5,
                      eval_every=2, max_length=48, device="cpu", lora_rank=4, lora_targets="q_proj,v_proj,down_proj"))
    last = tmp_path / "rm" / "last"
    assert json.load(open(last / "adapter_config.json"))["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    ours = RewardModel.from_pretrained(str(last))                      # the merged checkpoint
    texts = [("Tell me about Tom.", "Tom was happy."), ("A story?", "The dog ran away and was sad.")]
    scores = ours.score([p for p, _ in texts], [r for _, r in texts])
    base = transformers.AutoModelForSequenceClassification.from_pretrained(STORIES, num_labels=1, pad_token_id=0)
    hf = peft.PeftModel.from_pretrained(base, str(last)).eval()
    from rm import encode
    from model import pad_batch
    idx, mask = pad_batch([encode(ours.tok, p, r, 48) for p, r in texts], left=False)
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask.long()).logits[:, 0]
    assert torch.allclose(scores, theirs, atol=1e-4), (scores, theirs)
    # a policy: adapters on a causal LM
    torch.manual_seed(0)
    policy = Llama.from_pretrained(STORIES)
    params = add_lora(policy, rank=4, alpha=8, targets=("q_proj", "up_proj"))
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    opt = torch.optim.AdamW(params)
    save_training_checkpoint(policy.save_pretrained, params, opt, str(tmp_path / "policy"), {"step": 1}, policy)
    idx = torch.tensor([[1, 400, 401, 260, 300, 12, 99]])
    hf = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(STORIES),
                                        str(tmp_path / "policy")).eval()
    with torch.no_grad():
        assert (hf(idx).logits - policy(idx)).abs().max().item() < 1e-4


def test_lora_flags_are_checked():
    model = Llama(small_cfg())
    with pytest.raises(UserError, match="unknown layer"):
        add_lora(model, 4, 8, targets=("qkv",))
    with pytest.raises(UserError, match="positive"):
        add_lora(model, 0, 8)


def test_lora_gradients_are_the_chain_rule_through_the_merged_weight():
    """dL/dA = s B^T dL/dW' and dL/dB = s dL/dW' A^T, with W' = W + s B A; the base gets no gradient."""
    import copy
    torch.manual_seed(1)
    model = Llama(small_cfg(num_hidden_layers=1)).init_weights()
    plain = copy.deepcopy(model)
    adapters = add_lora(model, 2, 4)
    for p in adapters:
        p.data.normal_(std=0.1)
    idx = torch.randint(0, 96, (2, 6))
    model(idx).logsumexp(-1).sum().backward()
    lora = model.layers[0].self_attn.q_proj
    plain.load_state_dict({n: get() for n, _, get in plain_tensors(model)})   # every adapter merged
    plain.requires_grad_(False)
    W = plain.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    plain(idx).logsumexp(-1).sum().backward()
    s = lora.scale
    assert torch.allclose(lora.lora_A.grad, s * lora.lora_B.detach().T @ W.grad, atol=1e-5)
    assert torch.allclose(lora.lora_B.grad, s * W.grad @ lora.lora_A.detach().T, atol=1e-5)
    assert all(q.grad is None for n, q in model.named_parameters() if ".lora_" not in n)


# -----------------------------------------------------------------------------
# gradient checkpointing and precision

def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves for backward while fn runs (parameters excluded)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_only_block_inputs():
    torch.manual_seed(0)
    model = Llama(small_cfg(num_hidden_layers=3)).init_weights()
    idx = torch.randint(0, 96, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :4] = False
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        nbytes, logits = saved_bytes(lambda: model(idx, mask=mask), params)
        logits[mask].logsumexp(-1).sum().backward()
        grads.append((nbytes, [p.grad.clone() for p in model.parameters()]))
    (full, g0), (ckpt, g1) = grads
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
    assert ckpt < 0.4 * full


@pytest.mark.slow
def test_bf16_autocast_trains_fp32_masters_with_bf16_activations(tmp_path):
    from rm import TrainConfig, train
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(24))
    cfg = TrainConfig(data=data, preset="tiny", out=str(tmp_path / "rm"), batch_size=8, micro_batch=4,
                      eval_every=2, max_length=48, dtype="bf16", device="cpu")
    state = train(cfg)
    assert state["step"] == 6                                             # the tiny preset's 3 epochs
    rec = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl") if '"train"' in line]
    assert rec[-1]["loss"] < rec[0]["loss"]                               # it learns in bf16
    from safetensors import safe_open
    with safe_open(tmp_path / "rm" / "last" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}   # fp32 masters are what is saved
    with pytest.raises(UserError, match="loss scaling"):
        train(TrainConfig(data=data, preset="tiny", out=str(tmp_path / "rm16"), dtype="fp16", device="cpu"))
    # under autocast the KV cache and the activations are bf16, the master weights stay fp32
    model = Llama(small_cfg()).init_weights()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 8)
        logits = model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert cache.k[0].dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32


def test_lora_samples_at_the_plain_models_cost_in_fp32_and_keeps_a_young_adapter_in_bf16(stories):
    """The sampler prepares the adapters for its call (lora.merged). fp32 layers fold each adapter into a copy of the
    weight: a decoded token runs as many aten ops as with the plain model (the unmerged adapters ran 1.68x), its
    logprobs are the unmerged model's to fp32 rounding, and the copies are gone afterwards. bf16 layers keep the
    adapter apart: rounding W + BA to bf16 would erase most of an adapter whose change is 3e-3 of W (a bf16 merge
    keeps 0.57 of its effect on the logits, by cosine); apart, the sampler's forward is the training forward's."""
    from bench import per_token
    from lora import lora_disabled, merged
    from sample import generate
    _, tok = stories
    model = Llama.from_pretrained(STORIES)
    prompts = [tok.encode(p) for p in ("Once upon a time", "The dog", "A")]
    run = lambda n: generate(model, prompts, n, temperature=1.0, seed=[1, 2, 3], stop_ids=[])  # noqa: E731
    plain_ops, _ = per_token(run, 16)
    torch.manual_seed(0)
    for p in add_lora(model, 4, 8):
        p.data.normal_(std=0.05)                                          # adapters that change the outputs
    lora_ops, _ = per_token(run, 16)
    assert lora_ops <= 1.15 * plain_ops
    toks, lps = generate(model, prompts, 12, temperature=1.0, seed=[1, 2, 3], stop_ids=[])
    assert all(m.merged is None and m.cast is None for m in model.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():                                                 # teacher-forced, adapters unmerged
        for p, t, lp in zip(prompts, toks, lps):
            logp = model(torch.tensor([p + t])).log_softmax(-1)[0, len(p) - 1:-1]
            again = logp.gather(-1, torch.tensor(t)[:, None]).squeeze(-1)
            assert (again - torch.tensor(lp)).abs().max() < 1e-4              # (cached vs full: fp32 rounding)
    model = Llama.from_pretrained(STORIES, dtype=torch.bfloat16)
    add_lora(model, 4, 8)
    for m in model.modules():
        if isinstance(m, LoRALinear):                                     # |s B A| = 3e-3 |W|
            m.lora_B.data.normal_()
            m.lora_B.data *= 3e-3 * m.weight.float().norm() / (m.scale * m.lora_B @ m.lora_A).norm()
    idx = torch.tensor([[1] + list(range(300, 340))])
    with torch.no_grad():
        with lora_disabled(model):
            base = model(idx)
        trained = model(idx)
        with merged(model):
            assert all(m.merged is None and m.cast is not None for m in model.modules() if isinstance(m, LoRALinear))
            sampled = model(idx)
    effect = torch.nn.functional.cosine_similarity((sampled - base).flatten(), (trained - base).flatten(), dim=0)
    assert effect > 0.999 and (trained - base).abs().max() > 0.1


def test_reward_scores_are_fp32_under_bf16_autocast():
    """The reward / value head computes in fp32 on fp32 hidden states whatever the autocast: under bf16 autocast the
    scores equal the fp32 head applied to the same hidden states, and are not bf16 numbers."""
    from model import load_tokenizer
    from rm import RewardModel
    trunk = Llama.from_pretrained(STORIES, lm_head=False)
    reward_model = RewardModel(trunk, load_tokenizer(STORIES, trunk.config))
    torch.manual_seed(0)
    idx, mask = torch.randint(3, 500, (6, 20)), torch.ones(6, 20, dtype=torch.bool)
    mask[1, :5] = False
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = reward_model(idx, mask)
        _, h = trunk(idx, mask=mask, return_hidden=True, logits="none")
    want = h[torch.arange(6), -1].float() @ reward_model.head.weight[0].float()
    assert scores.dtype == torch.float32 and torch.allclose(scores, want, rtol=1e-6, atol=1e-6)
    assert (scores.bfloat16().float() != scores).any()                    # not rounded to bf16


def test_a_nan_gradient_skips_the_step_and_a_run_of_them_stops(capsys):
    """One non-finite gradient would make the weights and AdamW's moments NaN for good: the step is skipped (weights
    and moments unchanged), counted in the state and said; max_bad_steps in a row stop the run with one message."""
    from sft import Config
    from trainer import make_optimizer, optimizer_step
    model = Llama(small_cfg()).init_weights()
    params = [p for p in model.parameters()]
    opt = make_optimizer(model, 1e-2, 0.0)
    cfg, state = Config(max_bad_steps=2), {"step": 0}
    idx = torch.randint(0, 96, (2, 6))
    model(idx).logsumexp(-1).sum().backward()
    optimizer_step(params, opt, cfg, 1.0, state)                          # a good step: moments exist
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    model(idx).logsumexp(-1).sum().backward()
    params[3].grad.view(-1)[0] = float("nan")
    norm = optimizer_step(params, opt, cfg, 1.0, state)
    assert norm != norm and state["skipped_steps"] == 1 and "skipped" in capsys.readouterr().err
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, params))
    assert all(p.grad is None for p in params)
    model(idx).logsumexp(-1).sum().backward()
    params[0].grad.view(-1)[0] = float("inf")
    with pytest.raises(UserError, match="2 optimizer steps in a row had a non-finite gradient norm"):
        optimizer_step(params, opt, cfg, 1.0, state)


def test_masked_attention_on_a_gpu_leaves_cudnn_out():
    """The pinned torch's cuDNN attention returns NaN gradients for some masked inputs on H100 / H200: a masked
    forward on a GPU runs with cuDNN's kernel switched off, every other choice is left to PyTorch."""
    from model import attention_kernels
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels("cuda", masked=True):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    for device, masked in (("cuda", False), ("cpu", True)):
        with attention_kernels(device, masked):
            assert torch.backends.cuda.cudnn_sdp_enabled()


def test_sft_runs_right_padded_rows_without_a_mask(stories, monkeypatch):
    """SFT's rows are right-padded, so causal attention alone is exact for every real token: its forward passes no
    mask (a GPU then runs flash attention), and the loss is the masked forward's."""
    import sft
    model, tok = stories
    batch = [(ids, [True] * len(ids)) for ids in (tok.encode("Once upon a time there was a dog"), tok.encode("Hi"))]
    seen, real = [], model.forward
    monkeypatch.setattr(model, "forward", lambda idx, *a, **k: seen.append(k.get("mask")) or real(idx, *a, **k))
    with torch.no_grad():
        loss, n = sft.sft_loss(model, batch, torch.device("cpu"), torch.float32)
    assert seen == [None]
    T = max(len(ids) for ids, _ in batch)
    idx, mask = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.bool)
    for r, (ids, _) in enumerate(batch):
        idx[r, :len(ids)], mask[r, :len(ids)] = torch.tensor(ids), True
    with torch.no_grad():
        logits = real(idx, mask=mask)
    tgt = torch.where(mask[:, 1:], idx[:, 1:], -100)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), reduction="sum")
    assert n == int(mask[:, 1:].sum()) and torch.allclose(loss, want, rtol=1e-6)


# -----------------------------------------------------------------------------
# the memory plan

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
    assert r.returncode == 0 and len(cases) == 11, r.stderr
    assert {(c["job"], c["settings"]) for c in cases} == {(j, s) for j in ("rm", "sft", "ppo", "sample")
                                                          for s in ("paper", "full", "lora") if (j, s) != ("sample", "lora")}
    assert all(0.85 <= c["planned_bytes"] / c["measured_bytes"] <= 1.15 for c in cases), cases
    assert run("memory.py", "--check=huge").returncode == 2
    r = run("almost.py", "--dry_run=true", "--stages=rm,sft,ppo")
    assert r.returncode == 0 and all(f"memory plan ({j}," in r.stdout for j in ("rm", "sft", "ppo")), r.stderr


@pytest.mark.slow
def test_almost_under_torchrun_runs_only_trainer_stages(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), f"--out={tmp_path}", "--stages=queries,rm"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2 and "only the trainer stages" in r.stderr


# -----------------------------------------------------------------------------
# torchrun: 2 gloo processes against 1 process on the same global batch

def launch(script, args, n, tmp_path, timeout=300):
    """Run a script alone (n=1) or under torchrun with n gloo processes; fails the test on a nonzero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, script), *args] if n == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
         os.path.join(ROOT, script), *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:   # a hang: end torchrun's workers too, not only torchrun
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s (processes out of step?)")
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def max_diff(a, b):
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)
    d = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    print(f"max |difference| {d:.1e}: {os.path.relpath(a, os.path.dirname(os.path.dirname(a)))} vs {b}")  # pytest -s
    return d


def train_losses(path):
    return [json.loads(line)["loss"] for line in open(path) if '"train"' in line or '"split"' not in line]


# Tolerance: summing gradients over processes changes only the order of float additions (~1e-7 relative);
# AdamW's first steps move each weight by about lr whatever the gradient's size, so after a few steps at lr 1e-3
# the weights agree to ~5e-5. We allow 3e-4 on any weight and 1e-5 (relative) on every logged loss.
WEIGHT_TOL = 3e-4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    return write_jsonl(d / "pairs.jsonl", toy_pairs(40))


RM_ARGS = ["--preset=tiny", "--batch_size=8", "--micro_batch=2", "--epochs=0.5", "--eval_every=3", "--log_every=1",
           "--max_length=48", "--device=cpu"]


@pytest.mark.slow
def test_rm_ddp_and_fsdp_match_one_process(tmp_path, pairs):
    args = [f"--data={pairs}", *RM_ARGS]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=ddp"], 2, tmp_path)
    launch("rm.py", [*args, "--out=fsdp", "--fsdp=true", "--grad_checkpointing=true"], 2, tmp_path)
    for other in ("ddp", "fsdp"):
        assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / f"{other}/last/model.safetensors") < WEIGHT_TOL
        assert train_losses(tmp_path / "one/metrics.jsonl") == pytest.approx(
            train_losses(tmp_path / f"{other}/metrics.jsonl"), rel=1e-5)
    # an FSDP checkpoint holds whole tensors (weights and optimizer moments; the run's final checkpoint keeps no
    # moments, so this one stops before the end): one process resumes it and ends where one process alone ends
    launch("rm.py", [*args, "--out=mixed", "--fsdp=true", "--stop_after=1"], 2, tmp_path)
    launch("rm.py", [*args, "--out=mixed"], 1, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "mixed/last/model.safetensors") < WEIGHT_TOL


@pytest.mark.slow
def test_fsdp_bf16_checkpoints_hold_the_fp32_masters(tmp_path, pairs):
    """Under FSDP with bf16 compute the root module keeps bf16 copies after a forward; a checkpoint must hold the
    fp32 master weights (what a resumed run trains on), not those copies."""
    launch("rm.py", [f"--data={pairs}", *RM_ARGS, "--out=bf", "--fsdp=true", "--dtype=bf16"], 2, tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "bf/last/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert json.load(open(tmp_path / "bf/last/config.json"))["torch_dtype"] == "float32"


@pytest.mark.slow
def test_fsdp_with_a_batch_that_does_not_split_evenly(tmp_path):
    """5 training pairs, micro-batches of 2, 2 processes: shares of 3 and 2 pairs, so process 1 runs a zero-weight
    micro-batch to stay in step with process 0's collectives (else FSDP hangs), and the result is still one
    process's."""
    data = write_jsonl(tmp_path / "six.jsonl", toy_pairs(6, seed=3))
    args = [f"--data={data}", *RM_ARGS, "--batch_size=8", "--eval_every=1"]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=two", "--fsdp=true"], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "two/last/model.safetensors") < WEIGHT_TOL
    assert train_losses(tmp_path / "one/metrics.jsonl") == pytest.approx(train_losses(tmp_path / "two/metrics.jsonl"),
                                                                           rel=1e-5)


@pytest.mark.slow
def test_rm_lora_under_fsdp_matches_one_process_and_resumes(tmp_path, pairs):
    args = [f"--data={pairs}", *RM_ARGS, "--lora_rank=4", "--lora_targets=q_proj,v_proj,gate_proj"]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=two", "--fsdp=true"], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/adapter_model.safetensors", tmp_path / "two/last/adapter_model.safetensors") < WEIGHT_TOL
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "two/last/model.safetensors") < WEIGHT_TOL
    # stop after one step, resume from base + adapters: the same end
    launch("rm.py", [*args, "--out=split", "--stop_after=1"], 1, tmp_path)
    launch("rm.py", [*args, "--out=split"], 1, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "split/last/model.safetensors") < 1e-6
    r = subprocess.run([sys.executable, os.path.join(ROOT, "rm.py"), f"--data={pairs}", *RM_ARGS, "--lora_rank=8",
                        "--out=split"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "another run" in r.stderr


@pytest.mark.slow
def test_a_qwen2_reward_model_with_lora_under_fsdp_matches_one_process(tmp_path, pairs, qwen2_stories):
    """The Qwen2 folder (q/k/v biases under the adapters, a tied, padded vocabulary) through rm.py with LoRA, alone
    and under FSDP over 2 processes: the same adapters, and a Qwen2ForSequenceClassification checkpoint."""
    args = [f"--data={pairs}", *RM_ARGS, f"--model={qwen2_stories}", "--lora_rank=4"]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=two", "--fsdp=true"], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/adapter_model.safetensors", tmp_path / "two/last/adapter_model.safetensors") < WEIGHT_TOL
    assert json.load(open(tmp_path / "two/last/config.json"))["architectures"] == ["Qwen2ForSequenceClassification"]


@pytest.mark.slow
@pytest.mark.parametrize("scale_flags", [[], ["--fsdp=true", "--grad_checkpointing=true"]], ids=["ddp", "fsdp"])
def test_sft_on_two_processes_matches_one(tmp_path, scale_flags):
    names, things = ["Tom", "Lily", "Max", "Sue", "Ben"], ["ball", "cat", "tree", "cake", "box", "bird"]
    rows = [{"query_id": i, "usable": True, "turns": [
        {"role": "user", "text": f"Once upon a time, {names[i % 5]} found a {things[i % 6]}."},
        {"role": "assistant", "text": f"{names[i % 5]} played with the {things[i % 6]} all day." + " It was fun." * (i % 3)}]}
        for i in range(30)]
    data = write_jsonl(tmp_path / "sp.jsonl", rows)
    flags = [f"--data={data}", f"--model={STORIES}", "--epochs=1", "--batch_size=8", "--micro_batch=2",
             "--eval_every=2", "--lr=1e-3", "--device=cpu"]
    launch("sft.py", [*flags, "--out=one"], 1, tmp_path)
    launch("sft.py", [*flags, "--out=two", *scale_flags], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "two/last/model.safetensors") < WEIGHT_TOL
    assert max_diff(os.path.join(STORIES, "model.safetensors"), tmp_path / "one/last/model.safetensors") > 1e-3
    assert train_losses(tmp_path / "one/metrics.jsonl") == pytest.approx(train_losses(tmp_path / "two/metrics.jsonl"),
                                                                           rel=1e-5)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, pairs):
    d = tmp_path_factory.mktemp("rm")
    launch("rm.py", [f"--data={pairs}", *RM_ARGS, "--out=rm"], 1, d)
    return str(d / "rm" / "best")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--fsdp=true"], ["--lora_rank=4", "--grad_checkpointing=true"]],
                         ids=["ddp", "fsdp", "lora"])
def test_ppo_on_two_processes_matches_one(tmp_path, reward_model, flags):
    """One minibatch per rollout batch (minibatch = batch_size): the same rollouts (per-row sampler seeds), the
    same whitening (global statistics) and the same summed gradients."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about Lily.\nWhat is a dog?\nTom has a ball.\nSing a song.\nA big red car.\n")
    args = [f"--policy={STORIES}", f"--rm={reward_model}", f"--prompts={prompts}", "--steps=2", "--batch_size=4",
            "--minibatch=4", "--ppo_epochs=2", "--max_new_tokens=12", "--lr=1e-3", "--value_lr=1e-3",
            "--samples_per_log=0", "--penalize_missing_eos=false", "--device=cpu", *flags]
    launch("ppo.py", [*args, "--out=one"], 1, tmp_path)
    launch("ppo.py", [*args, "--out=two"], 2, tmp_path)
    for sub in ("policy", "value"):
        assert max_diff(tmp_path / f"one/last/{sub}/model.safetensors",
                        tmp_path / f"two/last/{sub}/model.safetensors") < WEIGHT_TOL
    one = [json.loads(line) for line in open(tmp_path / "one/metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two/metrics.jsonl")]
    for a, b in zip(one, two):
        for k in ("score_mean", "kl", "response_length", "non_score_reward"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5)
    assert abs(one[1]["kl"]) > 1e-4                                       # the second rollout comes from a new policy


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


@pytest.mark.slow
def test_almost_dry_run_plans_the_sampling_stages():
    """The paper's command with shapes for folders: every sampling model is planned at --batch_size rows of its
    context; at 32 rows the 30B generator does not fit, at the README's 4 it does."""
    d = os.path.join(ROOT, "data", "almost")
    gens = (f"30b-faithful-3shot=llama-30b:{d}/Faithful_prompt.txt:3,13b-hhh-3shot=llama-13b:{d}/HHH_prompt.txt:3,"
            f"7b-hhh-1shot=llama-7b:{d}/HHH_prompt.txt:1")
    base = [os.path.join(ROOT, "almost.py"), "--profile=paper", "--dry_run=true", "--device=cuda",
            "--query_model=llama-7b", "--rm_model=llama-7b", f"--generators={gens}",
            "--rubric=30b-faithful-3shot>13b-hhh-3shot>7b-hhh-1shot", f"--assistant=llama-30b:{d}/Faithful_prompt.txt:3",
            f"--user=llama-30b:{d}/HHH_prompt.txt:3", "--sft_model=llama-7b", "--lora_rank=16",
            "--grad_checkpointing=true", "--stages=queries,responses,selfplay"]
    r = subprocess.run([sys.executable, *base], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    plan30 = r.stdout[r.stdout.index("memory plan (sample, llama-30b, 32 rows x 2048"):]
    assert "does NOT fit in 80 GiB" in plan30.split("(used by")[0] and "largest batch that fits: 5 rows" in plan30
    assert "responses 30b-faithful-3shot, selfplay assistant, selfplay user" in plan30
    r = subprocess.run([sys.executable, *base, "--batch_size=4"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "does NOT fit" not in r.stdout, r.stdout


SYNCED_SAMPLING = """
import json, sys
import torch
from common import rank
from model import load
from sample import generate, shared_prefix_length, SHARE_PREFIX
from trainer import ScaleConfig, end_distributed, prepare_for_training, setup_distributed
setup_distributed("cpu")
sharded, tok = load(sys.argv[1])
alone, _ = load(sys.argv[1])                       # the same model unsharded: what each process must get
prepare_for_training(sharded, ScaleConfig(device="cpu", fsdp=True), torch.float32)
enc = lambda t: tok.encode(t, bos=True)
out = {}
# 1. process 0's rows end at their first token (the stop id is the token each samples first); process 1's never stop
prompts = [[enc("Tom has a ball.")], [enc("Once upon a time"), enc("Lily saw a big dog.")]][rank()]
first = [t[0] for t in generate(alone, prompts, 1, temperature=0, stop_ids=[])[0]]
stop = first if rank() == 0 else []
out["ends"] = generate(sharded, prompts, 16, temperature=0, stop_ids=stop)[0]
assert out["ends"] == generate(alone, prompts, 16, temperature=0, stop_ids=stop)[0], out
assert (rank() == 0) == (max(map(len, out["ends"])) == 0) and (rank() == 0 or min(map(len, out["ends"])) == 16)
# 2. prompts that share a long prefix on process 0 only (prefilled once there: one forward more than process 1)
story = enc("Once upon a time, there was a little girl named Lily. She loved to play in the park with her "
            "friends every day. One day she saw a big red ball.")
prompts = [[story + tok.encode(" She", bos=False), story + tok.encode(" Tom", bos=False)],
           [enc("The sun was hot."), enc("A dog ran.")]][rank()]
out["prefix"] = shared_prefix_length(prompts)
assert (rank() == 0) == (out["prefix"] >= SHARE_PREFIX)
out["shared"] = generate(sharded, prompts, 12, temperature=1.0, seed=[1, 2])[0]
assert out["shared"] == generate(alone, prompts, 12, temperature=1.0, seed=[1, 2], share_prefix=0)[0], out
open(f"{sys.argv[2]}/out{rank()}.json", "w").write(json.dumps({"rank": rank(), **out}))
del sharded
end_distributed()
"""


@pytest.mark.slow
def test_fsdp_sampling_keeps_the_processes_in_step(tmp_path):
    """Under FSDP every forward gathers the weights from all processes, so the sampler must run as many forwards in
    each: here process 0's rows all end at their first token while process 1's decode to the budget, and then only
    process 0's prompts share a prefix long enough to be prefilled once. Without the agreement the processes wait for
    each other for ever (the timeout fails the test); with it every process gets what one process alone gets."""
    script = tmp_path / "synced.py"
    script.write_text(SYNCED_SAMPLING)
    launch(str(script), [STORIES, str(tmp_path)], 2, tmp_path, timeout=120)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    assert len(outs) == 2 and outs[0]["ends"] == [[]] and all(len(t) == 16 for t in outs[1]["ends"])


FSDP_ROLLOUT_AND_SAVE = """
import json, sys
import torch
from bench import DispatchCounter
from common import rank
from memory import AllocationTracker
from model import load
from sample import generate
from sft import Config
from trainer import end_distributed, prepare_for_training, setup_distributed
folder, out_dir = sys.argv[1:]
setup_distributed("cpu")
model, tok = load(folder)
alone, _ = load(folder)
prepare_for_training(model, Config(device="cpu", fsdp=True), torch.float32)
prompts = [tok.encode(p) for p in ("Once upon a time", "The dog")][rank():rank() + 1]
out = {"rank": rank(), "gathers": {}}
for n in (4, 16):
    with DispatchCounter() as c:
        toks, _ = generate(model, prompts, n, temperature=1.0, seed=[rank()], stop_ids=[])
    out["gathers"][n] = sum(v for k, v in c.collectives.items() if "allgather" in k or "all_gather" in k)
    assert toks == generate(alone, prompts, n, temperature=1.0, seed=[rank()], stop_ids=[])[0]
largest = max(p.numel() * p.element_size() for p in alone.parameters())
with AllocationTracker() as t:
    base = t.live
    model.save_pretrained(out_dir + "/saved", max_shard_bytes=60_000)
    out.update(save_peak=t.peak - base, save_after=t.live - base, largest=largest)
open(f"{out_dir}/out{rank()}.json", "w").write(json.dumps(out))
del model
end_distributed()
"""


@pytest.mark.slow
def test_fsdp_rollouts_gather_once_and_saves_hold_one_tensor_at_a_time(tmp_path):
    """FSDP over 2 gloo processes. A rollout gathers every block's weights once (sample.gathered), not once a token:
    the all-gathers of 4 and of 16 decoded tokens are as many, and the tokens are one process's. A save gathers one
    tensor at a time (a collective) and writes shards: process 1 keeps nothing and never holds more than one full
    tensor in flight; process 0 holds one shard and the tensor in flight; the sharded folder loads in transformers."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_ROLLOUT_AND_SAVE)
    launch(str(script), [STORIES, str(tmp_path)], 2, tmp_path, timeout=180)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    for o in outs:
        assert o["gathers"]["4"] == o["gathers"]["16"] > 0
    # (a gathered tensor is freed when gloo's worker thread lets go of it, a moment after the save drops it: the one
    # before may still be there when the next arrives; the whole model is 8x the largest tensor)
    zero, one = outs
    assert one["save_peak"] <= 2 * one["largest"] and one["save_after"] < one["largest"] / 100
    assert zero["save_peak"] <= 60_000 + 2 * zero["largest"] and zero["save_after"] < zero["largest"] / 100
    files = sorted(os.listdir(tmp_path / "saved"))
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 5
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    ours = Llama.from_pretrained(STORIES)
    idx = torch.tensor([[1, 400, 300, 200, 100]])
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max() < 1e-4


def test_a_lora_save_merges_one_tensor_at_a_time(tmp_path):
    """Saving a LoRA model merges each adapter into its weight while the file is written: the memory the save adds
    is one shard and the tensor in flight, not a merged copy of the model; nothing stays behind; the folder is the
    merged model."""
    from memory import AllocationTracker
    model = Llama.from_pretrained(STORIES)
    torch.manual_seed(0)
    for p in add_lora(model, 4, 8):
        p.data.normal_(std=0.05)
    largest = max(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n)
    merged_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, LoRALinear))
    with AllocationTracker() as t:
        model.save_pretrained(str(tmp_path / "m"), max_shard_bytes=40_000)
        peak, after = t.peak, t.live
    assert peak <= 40_000 + largest < merged_bytes and after < 1000
    idx = torch.tensor([[1, 400, 300, 200]])
    with torch.no_grad():
        assert (Llama.from_pretrained(str(tmp_path / "m"))(idx) - model(idx)).abs().max() < 1e-4   # fp32 rounding


LONG_OPENING = ("Once upon a time, there was a little girl named Lily. She loved to play in the park with her friends "
                "every day. One day she saw ")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ends", "prefix"])
def test_fsdp_ppo_with_rows_that_end_apart(tmp_path, reward_model, case):
    """A PPO step under FSDP whose rollout rows end at different steps on the two processes: at seed 1337's first
    step (found by hand, see the asserts) process 1's row ends at its first token while process 0's runs to the
    budget ("ends"); or process 1's two prompts share a long prefix and process 0's do not ("prefix"). The run
    finishes (a hang fails at the timeout) and matches one process."""
    policy = eos_prone_policy(tmp_path / "policy")
    prompts = tmp_path / "prompts.txt"
    rows = 2 if case == "ends" else 4
    prompts.write_text("Tell me about Lily.\nWhat is a dog?\n" if case == "ends" else
                       f"{LONG_OPENING}a cat.\n{LONG_OPENING}a big red ball.\nWhat is a dog?\nSing a song.\n")
    args = [f"--policy={policy}", f"--rm={reward_model}", f"--prompts={prompts}", "--steps=2",
            f"--batch_size={rows}", f"--minibatch={rows}", "--ppo_epochs=1", "--max_new_tokens=12", "--lr=1e-3",
            "--value_lr=1e-3", "--samples_per_log=0", "--penalize_missing_eos=false", "--device=cpu", "--fsdp=true"]
    launch("ppo.py", [*args, "--out=one"], 1, tmp_path)
    launch("ppo.py", [*args, "--out=two"], 2, tmp_path, timeout=180)
    one = [json.loads(line) for line in open(tmp_path / "one/metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two/metrics.jsonl")]
    if case == "ends":   # one response of 12 tokens (no EOS) and one of its EOS alone
        assert one[0]["eos_rate"] == 0.5 and one[0]["response_length"] == 6.5
    for a, b in zip(one, two):
        for k in ("score_mean", "kl", "response_length", "eos_rate"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5)
    assert max_diff(tmp_path / "one/last/policy/model.safetensors", tmp_path / "two/last/policy/model.safetensors") \
        < WEIGHT_TOL


GRADIENTS = """
import sys
import torch
from safetensors.torch import save_file
from common import rank
from lora import full_tensor
from readers import read_pairs
from rm import RewardModel, TrainConfig, tokenize_pairs, train_step
from trainer import end_distributed, setup_distributed, sync_grads
from trainer import prepare_for_training
model_dir, pairs, mode, out = sys.argv[1:]
setup_distributed("cpu")
reward_model = RewardModel.from_pretrained(model_dir, seed=0)   # the same fresh head in every process
cfg = TrainConfig(device="cpu", micro_batch=2, fsdp=mode == "fsdp")
params = prepare_for_training(reward_model, cfg, torch.float32)
batch = tokenize_pairs(reward_model, read_pairs(pairs), pairs)
train_step(reward_model, batch, cfg, torch.device("cpu"), torch.float32, [0.0] * 4)
sync_grads(params, cfg)                                             # DDP's sum (FSDP reduced in backward)
grads = {f"grad.{i}": full_tensor(p.grad).contiguous() for i, p in enumerate(params)}
with torch.no_grad():                                               # one plain SGD step: the update is the gradient
    for p in params:
        p.add_(p.grad, alpha=-0.5)
weights = {f"weight.{i}": full_tensor(p).contiguous() for i, p in enumerate(params)}
if rank() == 0:
    save_file({**grads, **weights}, out)
del reward_model, params
end_distributed()
"""


@pytest.mark.slow
def test_gradients_and_an_sgd_step_on_two_processes_equal_one(tmp_path):
    """AdamW's update ignores a constant factor on the gradient, so comparing weights after AdamW steps cannot see a
    reduction that averages instead of sums, or a lost FSDP divide factor. Here the gradients themselves (after the
    trainer's reduction, before any optimizer) and the weights after one plain SGD step are compared: one process
    against two with DDP and with FSDP, on 5 pairs (shares of 3 and 2: the short process runs a zero-weight
    micro-batch). A reduction off by the factor 2 fails by far more than the tolerance."""
    from safetensors.torch import load_file
    script = tmp_path / "grads.py"
    script.write_text(GRADIENTS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(5, seed=7))
    launch(str(script), [STORIES, pairs, "one", str(tmp_path / "one.safetensors")], 1, tmp_path)
    one = load_file(tmp_path / "one.safetensors")
    assert max(v.abs().max().item() for k, v in one.items() if k.startswith("grad.")) > 1e-3   # a real gradient
    for mode in ("ddp", "fsdp"):
        launch(str(script), [STORIES, pairs, mode, str(tmp_path / f"{mode}.safetensors")], 2, tmp_path, timeout=120)
        two = load_file(tmp_path / f"{mode}.safetensors")
        assert sorted(two) == sorted(one)
        for k in one:
            scale = one[k].abs().max().item()
            assert (two[k] - one[k]).abs().max().item() <= 1e-5 * max(scale, 1.0), (mode, k)
