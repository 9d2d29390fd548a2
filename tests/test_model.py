"""model.py: golden outputs of the real stories260K, parity with transformers, checkpoint round trips, a bad model folder
in one message, attention (cascade, chunked, masked on a GPU), gradient checkpointing."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (FAMILIES, ROOT, STORIES, edit_config, hf_family, needs_transformers, saved_bytes, small_cfg,
                      transformers)
from model import Llama, LlamaConfig, UserError, last_token_index, load
from sample import generate

REF = json.load(open(os.path.join(STORIES, "reference_outputs.json")))


# -----------------------------------------------------------------------------
# golden tests: stories260K against llama2.c's run.c and transformers (reference_outputs.json)

def test_bos_greedy_200_matches_llama2c(stories):
    model, tok = stories
    out, _ = generate(model, [[tok.bos_id]], 200, temperature=0, stop_ids=[])
    assert len(out[0]) == 200
    assert tok.decode(out[0]) == REF["bos_greedy_200_text"]


@pytest.mark.parametrize("case", REF["greedy_40"], ids=lambda c: c["prompt"][:12])
def test_prompted_greedy_token_for_token(stories, case):
    model, tok = stories
    ids = tok.encode(case["prompt"], bos=True)
    assert ids == case["input_ids"]
    out, _ = generate(model, [ids], 40, temperature=0, stop_ids=[])
    assert out[0] == case["greedy_new_ids"]
    assert tok.decode(out[0]) == case["greedy_text"]


def test_teacher_forced_nll(stories):
    model, tok = stories
    tf = REF["teacher_forced"]
    ids = torch.tensor([tok.encode(tf["text"], bos=True)])
    assert ids.shape[1] == tf["n_tokens_incl_bos"]
    with torch.no_grad():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
    assert abs(nll - tf["nll_sum"]) < 1e-3


def test_stop_ids_come_from_generation_config(stories):
    model, _ = stories
    assert model.eos_ids == [1, 2]          # generation_config.json; config.json says only 2
    assert model.config.eos_ids == [2]


def test_default_dtype_is_fp32_on_cpu(stories):
    model, _ = stories
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight   # tied


# -----------------------------------------------------------------------------
# parity with transformers on tiny random configs


CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "theta_500k": dict(rope_theta=500000.0),
    "llama3_rope": dict(rope_theta=500000.0, max_position_embeddings=256,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "head_dim_24": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


def hf_config(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def hf_random(cfg, seed=0):
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and sets norms to one: perturb them so they are tested
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def batch(V, B=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


@needs_transformers
@pytest.mark.parametrize("name", CONFIGS)
def test_hf_parity(tmp_path, name):
    """HF-saved random model -> our loader: same logits and final hidden states within 1e-4 (fp32)."""
    hf = hf_random(hf_config(**CONFIGS[name]))
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(str(tmp_path))
    idx = batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(idx, output_hidden_states=True)
        logits, h = ours(idx, return_hidden=True)
    assert logits.dtype == torch.float32
    assert (logits - ref.logits).abs().max().item() < 1e-4
    assert (h - ref.hidden_states[-1]).abs().max().item() < 1e-4


@needs_transformers
@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope", "head_dim_24", "biases"])
def test_hf_loads_what_we_save(tmp_path, name):
    """Our save_pretrained -> transformers.LlamaForCausalLM.from_pretrained: the same logits."""
    hf = hf_random(hf_config(**CONFIGS[name]))
    hf.save_pretrained(tmp_path / "a")
    ours = Llama.from_pretrained(str(tmp_path / "a"))
    ours.save_pretrained(str(tmp_path / "b"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b").eval()
    idx = batch(hf.config.vocab_size)
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max().item() < 1e-4


@needs_transformers
def test_left_padded_batch_matches_hf(tmp_path):
    """Padding mask + per-row positions: real tokens of a left-padded batch agree with HF given the same mask."""
    hf = hf_random(hf_config(**CONFIGS["gqa_tied"]))
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(str(tmp_path))
    idx = batch(hf.config.vocab_size, B=3, T=9)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[0, :4] = False
    mask[2, :1] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(idx, attention_mask=mask.long(), position_ids=pos).logits
        got = ours(idx, mask=mask)
    assert (got - ref)[mask].abs().max().item() < 1e-4


@needs_transformers
def test_sharded_checkpoints(tmp_path):
    """HF's sharded layout loads; ours shards above the threshold and both sides load it."""
    hf = hf_random(hf_config(**CONFIGS["mha_untied"]))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = Llama.from_pretrained(str(tmp_path / "hf"))
    ours.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=40_000)
    index = json.load(open(tmp_path / "ours" / "model.safetensors.index.json"))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "ours" / s).exists() for s in shards)
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    again = Llama.from_pretrained(str(tmp_path / "ours"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    idx = batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(idx).logits
        assert (ours(idx) - ref).abs().max().item() < 1e-4
        assert (again(idx) - ref).abs().max().item() < 1e-4
        assert (back(idx).logits - ref).abs().max().item() < 1e-4


@needs_transformers
def test_bf16_matches_hf_bf16(tmp_path):
    """bf16 weights: RMSNorm and RoPE angles in fp32, matmuls in bf16, logits returned in fp32, as HF does.
    Our bf16 logits match HF's bf16 logits far closer than bf16 is to fp32."""
    hf = hf_random(hf_config(**CONFIGS["gqa_tied"]))
    hf.save_pretrained(tmp_path)
    idx = batch(hf.config.vocab_size)
    ours = Llama.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    hf16 = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        got, ref16, ref32 = ours(idx), hf16(idx).logits.float(), hf(idx).logits
    assert ours.lm_head.weight.dtype == torch.bfloat16 and got.dtype == torch.float32
    gap = (ref16 - ref32).abs().max().item()
    assert gap > 1e-3                                           # bf16 really is coarser than fp32 here
    assert (got - ref16).abs().max().item() < 2e-4


def test_a_dtype_cast_keeps_ropes_frequencies_in_fp32(stories):
    """model.to(torch.bfloat16) casts floating buffers too; RoPE's inverse frequencies stay fp32 (a bf16 copy rotates
    every position by a wrong angle): a model built fp32 and cast gives the logits of the same weights loaded in
    bf16 from a checkpoint."""
    from model import rope_inv_freq
    model, _ = stories
    cast = Llama.from_pretrained(STORIES).to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.float32 and torch.equal(cast.inv_freq, rope_inv_freq(model.config))
    loaded = Llama.from_pretrained(STORIES, dtype=torch.bfloat16)
    idx = torch.tensor([[1] + list(range(300, 400))])               # long enough for the angles to matter
    with torch.no_grad():
        assert torch.equal(cast(idx), loaded(idx))


@needs_transformers
def test_bundled_model_parity_with_hf(stories):
    model, tok = stories
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES).eval()
    idx = torch.tensor([tok.encode("Once upon a time, Lily and Tom", bos=True)])
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < 1e-4


# -----------------------------------------------------------------------------
# saving and loading without surprises

def test_save_roundtrip_keeps_tokenizer_and_replaces_atomically(tmp_path, stories):
    model, tok = stories
    out = tmp_path / "ckpt"
    model.save_pretrained(str(out))
    import shutil
    shutil.copy(os.path.join(STORIES, "tokenizer.model"), out / "tokenizer.model")
    model.save_pretrained(str(out))   # saving again over it keeps the tokenizer, leaves no temporary folders
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert (out / "tokenizer.model").exists()
    m2, tok2 = load(str(out))
    idx = torch.tensor([tok.encode("The dog", bos=True)])
    with torch.no_grad():
        assert torch.equal(m2(idx), model(idx))
    assert m2.eos_ids == model.eos_ids and m2.lm_head.weight is m2.embed_tokens.weight


def test_from_pretrained_holds_one_copy_of_the_weights(tmp_path):
    """A bf16 checkpoint loaded as fp32 (so every tensor is converted into fresh memory): peak anonymous
    memory stays near one fp32 copy. Building a random model first and copying into it would hold two."""
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, max_position_embeddings=128)
    model = Llama(cfg).init_weights()
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "big"))
    tiny = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    Llama(tiny).to(torch.bfloat16).save_pretrained(str(tmp_path / "tiny"))
    del model
    code = f"""
import sys, threading, time
sys.path.insert(0, {ROOT!r})
import torch
from model import Llama
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
sys.setswitchinterval(1e-4)
peak, stop = [0], [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(1e-4)
Llama.from_pretrained({str(tmp_path / "tiny")!r}, dtype=torch.float32)  # one-time imports and setup
base = anon()
t = threading.Thread(target=watch)
t.start()
m = Llama.from_pretrained({str(tmp_path / "big")!r}, dtype=torch.float32)
stop[0] = True
t.join()
assert m.lm_head.weight.dtype == torch.float32
print(max(peak[0], anon()) - base)
"""
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert nbytes * 0.8 < grown < nbytes * 1.3, (grown, nbytes)  # two copies would be 2x


# -----------------------------------------------------------------------------
# the LLaMA family: Qwen2 / Qwen2.5 (a bias on q, k and v; tied or untied heads) and Mistral (a sliding window)

@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_qwen2_and_mistral_match_transformers(tmp_path, name):
    """A transformers-saved random Qwen2 (tied and untied) or Mistral: our logits within 1e-4 (fp32), left-padded and
    whole; greedy tokens equal to transformers' generate over 16 steps; our save loads in transformers with the same
    logits and keeps its model_type; Qwen2's o_proj has no bias and q, k, v have one."""
    hf = hf_family(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = Llama.from_pretrained(str(tmp_path / "hf"))
    family = FAMILIES[name][0].lower()
    assert ours.config.model_type == family and ours.config.context == 128
    attn = ours.layers[0].self_attn
    assert (attn.q_proj.bias is not None, attn.o_proj.bias is not None) == ((True, False) if family == "qwen2" else
                                                                         (False, False))
    idx = batch(640, T=13)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :5] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4
        got, ref = ours(idx, mask=mask), hf(idx, attention_mask=mask.long(), position_ids=pos).logits
        assert (got - ref)[mask].abs().max().item() < 1e-4
        want = hf.generate(idx[:1], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, [idx[0].tolist()], 16, temperature=0, stop_ids=[])[0][0] == want[0, 13:].tolist()
    ours.save_pretrained(str(tmp_path / "ours"))
    saved = json.load(open(tmp_path / "ours" / "config.json"))
    assert saved["model_type"] == family and saved["architectures"] == [FAMILIES[name][0] + "ForCausalLM"]
    back = getattr(transformers, FAMILIES[name][0] + "ForCausalLM").from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max().item() < 1e-4


@needs_transformers
def test_a_sliding_window_is_the_context_limit(tmp_path):
    """Mistral attends within a sliding window; sliding-window attention is not written here, so the window is the
    longest sequence this code runs: within it the logits are transformers' (the window changes nothing there), past
    it the sampler refuses in one message that names the window. Qwen2's window counts only with
    use_sliding_window, off in its released configs."""
    from model import LlamaConfig, UserError
    hf = hf_family("mistral", sliding_window=8)
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(str(tmp_path))
    assert ours.config.context == 8 and ours.config.max_position_embeddings == 128
    idx = batch(640, T=8)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4
    with pytest.raises(UserError, match="sliding window of 8 tokens"):
        generate(ours, [idx[0, :5].tolist()], 4, temperature=0)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        ours(batch(640, T=9))
    assert json.load(open(tmp_path / "config.json"))["sliding_window"] == 8
    qwen = {"model_type": "qwen2", "vocab_size": 9, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64, "sliding_window": 16}
    assert LlamaConfig.from_dict(qwen).context == 64
    assert LlamaConfig.from_dict({**qwen, "use_sliding_window": True}).context == 16


# -----------------------------------------------------------------------------
# a bad model folder ends in one message naming the file and the fix

def check(d, *words):
    with pytest.raises(UserError) as e:
        load(str(d))
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def edit_tensors(d, fn):
    state = load_file(d / "model.safetensors")
    fn(state)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_folder(tmp_path):
    check(tmp_path / "nope", "nope", "no such model folder")


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    check(ckpt, "config.json", "missing")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    check(ckpt, "config.json", "not valid JSON")


def test_config_not_llama(ckpt):
    edit_config(ckpt, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    check(ckpt, "config.json", "not a LLaMA", "gpt2")


def test_config_bad_heads(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    check(ckpt, "config.json", "num_key_value_heads=3")


def test_unsupported_rope_scaling(ckpt):
    edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    check(ckpt, "config.json", "yarn")


def test_missing_weights_file(ckpt):
    os.remove(ckpt / "model.safetensors")
    check(ckpt, "model.safetensors", "never pickles")


def test_corrupt_weights_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    check(ckpt, "model.safetensors", "not a readable safetensors")


def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda s: s.pop("model.layers.3.mlp.up_proj.weight"))
    check(ckpt, "model.layers.3.mlp.up_proj.weight", "lacks")


def test_extra_tensor(ckpt):
    edit_tensors(ckpt, lambda s: s.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2, 2)))
    check(ckpt, "model.safetensors", "unexpected tensor", "model.layers.9.mlp.up_proj.weight")


def test_wrong_shape(ckpt):
    edit_tensors(ckpt, lambda s: s.__setitem__("model.norm.weight", torch.ones(65)))
    check(ckpt, "model.norm.weight", "(65,)", "(64,)")


def test_weights_of_another_config(ckpt):
    edit_config(ckpt, hidden_size=128)
    check(ckpt, "shape", "config.json")


def test_missing_shard(tmp_path, stories):
    model, _ = stories
    model.save_pretrained(str(tmp_path / "s"), max_shard_bytes=100_000)
    index = json.load(open(tmp_path / "s" / "model.safetensors.index.json"))
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "s" / gone)
    with pytest.raises(UserError, match=gone):
        Llama.from_pretrained(str(tmp_path / "s"))


def test_missing_tokenizer(ckpt):
    os.remove(ckpt / "tokenizer.model")
    check(ckpt, "tokenizer.model", "missing")


def test_tokenizer_vocab_larger_than_model(ckpt):
    edit_config(ckpt, vocab_size=256)
    edit_tensors(ckpt, lambda s: s.__setitem__("model.embed_tokens.weight", s["model.embed_tokens.weight"][:256].clone()))
    check(ckpt, "tokenizer.model", "512 pieces", "vocab_size is 256")


# -----------------------------------------------------------------------------
# attention, padding and gradient checkpointing

def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [3, 2, 0, 3]


def test_cascade_attention_equals_attention_over_the_concatenation():
    """Hydragen's merge: attention over a shared prefix (read once) and each row's own keys, combined by their
    log-sum-exps, equals one softmax over prefix + own keys, with GQA, padding and a causal mask."""
    from model import cascade_attention
    torch.manual_seed(0)
    B, nh, nkv, T, P, S, hd = 3, 6, 2, 4, 7, 9, 8
    q = torch.randn(B, nh, T, hd)
    pk, pv = torch.randn(1, nkv, P, hd), torch.randn(1, nkv, P, hd)
    k, v = torch.randn(B, nkv, S, hd), torch.randn(B, nkv, S, hd)
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, :3] = False                                                  # row 1 is left-padded
    qi, kj = torch.arange(S - T, S)[:, None], torch.arange(S)[None]
    mask = (((kj <= qi) & real[:, None]) | (kj == qi))[:, None]          # (B, 1, T, S)
    full_mask = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), mask], -1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2),
        attn_mask=full_mask, enable_gqa=True)
    assert (cascade_attention(q, pk, pv, k, v, mask) - ref).abs().max() < 1e-5
    ref1 = torch.nn.functional.scaled_dot_product_attention(      # a decode step, nothing masked
        q[:, :, -1:], torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2),
        enable_gqa=True)
    assert (cascade_attention(q[:, :, -1:], pk, pv, k, v, None) - ref1).abs().max() < 1e-5


def test_attention_with_lse_in_chunks_equals_at_once(monkeypatch):
    """The scores are computed a chunk of queries at a time when they would pass SCORES_BYTES: same output."""
    import model as modellib
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    mask = torch.rand(2, 1, 37, 11) > 0.3
    mask[..., 0] = True
    whole = [modellib.attention_with_lse(q, k, v, m) for m in (None, mask, mask[:, :, :1])]
    monkeypatch.setattr(modellib, "SCORES_BYTES", 8 * 11 * 6 * 5)         # 5 query rows a chunk
    for (o, lse), m in zip(whole, (None, mask, mask[:, :, :1])):
        o2, lse2 = modellib.attention_with_lse(q, k, v, m)
        assert (o - o2).abs().max() < 1e-6 and (lse - lse2).abs().max() < 1e-6


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
