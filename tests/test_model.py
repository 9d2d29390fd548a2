"""model.py: golden outputs of the real stories260K, parity with transformers, checkpoint round trips."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES, needs_transformers, transformers
from model import Llama, LlamaConfig, Tokenizer, load
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


def test_tokenizer(stories):
    _, tok = stories
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    ids = tok.encode("Lily saw a dog.", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.encode("Lily saw a dog.", bos=False) == ids[1:-1]
    assert tok.decode(ids) == "Lily saw a dog."
    assert Tokenizer(os.path.join(STORIES, "tokenizer.model")).encode("hi") == tok.encode("hi")


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

FAMILIES = {   # name: (transformers' prefix, config fields)
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0, num_key_value_heads=2)),
    "qwen2_untied": ("Qwen2", dict(tie_word_embeddings=False, rope_theta=1000000.0, num_key_value_heads=1)),
    "mistral": ("Mistral", dict(sliding_window=4096, head_dim=24, rope_theta=1000000.0)),
}


def hf_family(name, seed=0, **kw):
    prefix, fields = FAMILIES[name]
    base = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, prefix + "Config")(**{**base, **fields, **kw})
    torch.manual_seed(seed)
    m = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
    with torch.no_grad():  # the biases HF zero-initialises, and the norms, perturbed so that they are tested
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


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
def test_a_qwen2_reward_model_scores_as_transformers_both_ways(tmp_path, chatml_tokenizer):
    """A Qwen2 trunk with a vocabulary larger than its tokenizer (Qwen pads it): our reward model saves as
    Qwen2ForSequenceClassification and transformers gives its scores; a transformers-saved one loads in ours with
    the same scores."""
    import shutil
    from rm import RewardModel, encode
    hf = hf_family("qwen2_untied")
    hf.save_pretrained(tmp_path / "base")
    for f in os.listdir(chatml_tokenizer):
        shutil.copy(os.path.join(chatml_tokenizer, f), tmp_path / "base")
    rm = RewardModel.from_pretrained(str(tmp_path / "base"), seed=3)
    assert rm.tok.vocab_size < rm.model.config.vocab_size
    rm.save_pretrained(str(tmp_path / "rm"))
    cfg = json.load(open(tmp_path / "rm" / "config.json"))
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and cfg["model_type"] == "qwen2"
    seq_cls = transformers.Qwen2ForSequenceClassification
    texts = [("What is a cat?", "A cat is a small animal."), ("Hi", "Hello there, how are you?")]
    ours = rm.score(*zip(*texts))
    with torch.no_grad():
        theirs = torch.cat([seq_cls.from_pretrained(tmp_path / "rm").eval()(torch.tensor([encode(rm.tok, p, r, 320)]))
                            .logits[:, 0] for p, r in texts])
    assert (theirs - ours).abs().max() < 1e-4
    torch.manual_seed(4)
    hf.config.num_labels, hf.config.pad_token_id = 1, 0
    hf_rm = seq_cls(hf.config).eval()
    hf_rm.save_pretrained(tmp_path / "hf_rm")
    for f in os.listdir(chatml_tokenizer):
        shutil.copy(os.path.join(chatml_tokenizer, f), tmp_path / "hf_rm")
    loaded = RewardModel.from_pretrained(str(tmp_path / "hf_rm"))
    with torch.no_grad():
        want = torch.cat([hf_rm(torch.tensor([encode(loaded.tok, p, r, 320)])).logits[:, 0] for p, r in texts])
    assert (loaded.score(*zip(*texts)) - want).abs().max() < 1e-4


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
