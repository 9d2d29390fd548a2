"""lora.py: adapters that start at the base, switch off and merge (into a checkpoint, one tensor at a time), their
gradients, the flags' checks, and sampling with them in fp32 and bf16."""
import json

import pytest
import torch

from conftest import STORIES, small_cfg
from lora import LoRALinear, add_lora, lora_disabled, merge_lora, plain_tensors
from model import Llama, UserError


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
