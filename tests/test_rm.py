"""rm.py: Bradley-Terry loss and metrics, scoring invariances, training, resume, HF parity (LLaMA, Qwen2, chat models
and templates), fp32 scores under bf16, bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES, hf_family, needs_transformers, tiny_bpe_model, toy_pairs, transformers, write_jsonl
from model import Llama, UserError
from rm import RewardModel, TrainConfig, bt_loss, encode, pad_batch, pair_metrics, tokenize_pairs, train
from tokenizer import format_dialogue


@pytest.fixture(scope="module")
def rm():
    return RewardModel.from_pretrained(STORIES, max_length=512)


TEXTS = [("Tell me a story.", "Lily saw a big dog. She was happy."), ("Hi", "Once upon a time, there was a cat."),
         ("What did Tom do?", "Tom went to the park and played with his ball all day long. He was tired."),
         ("Why?", "Because."), ("\n\nHuman: Hello\n\nAssistant: Hi!\n\nHuman: Tell me more", "Sure, here is more.")]


# -----------------------------------------------------------------------------
# loss, metrics, text format

def test_bt_loss_closed_form():
    rc, rr = torch.tensor([2.0, -1.0, 0.5, 30.0, -30.0]), torch.tensor([1.0, 1.0, 0.5, -30.0, 30.0])
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) if c - r > -30 else (r - c)
                   for c, r in zip(rc.tolist(), rr.tolist())) / 5
    assert abs(bt_loss(rc, rr).item() - expected) < 1e-5
    assert abs(bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() - math.log(2)) < 1e-6
    assert abs(bt_loss(rc, rr, reduction="sum").item() - 5 * expected) < 5e-5     # what train_step sums


def test_accuracy_counts_ties_as_wrong():
    m = pair_metrics(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 4.0, -1.0]))
    assert m["accuracy"] == 0.5            # the tie (1 vs 1) and the loss (3 vs 4) are wrong
    assert abs(m["margin"] - (0 + 1 - 1 + 1) / 4) < 1e-6


def test_format_and_truncation(rm):
    assert format_dialogue("What is 2+2?", "4.") == "\n\nHuman: What is 2+2?\n\nAssistant: 4."
    hh = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?"
    assert format_dialogue(hh, " Fine.") == hh + "\n\nAssistant: Fine."
    long = " ".join(["Lily played with the ball."] * 100) + " The end."
    ids = encode(rm.tok, "Tell me a story.", long, 64)
    assert len(ids) == 64 and ids[-1] == rm.tok.eos_id and rm.tok.bos_id not in ids
    assert rm.tok.decode(ids[:-1]).endswith("The end.")   # left-truncated: the response's end survives


# -----------------------------------------------------------------------------
# scoring invariances

def test_scores_do_not_depend_on_padding_side_batch_or_size(rm):
    prompts, responses = zip(*TEXTS)
    alone = torch.cat([rm.score([p], [r]) for p, r in TEXTS])
    for bs in (1, 2, 3, 5):
        assert (rm.score(prompts, responses, batch_size=bs) - alone).abs().max().item() < 1e-5
    perm = [3, 0, 4, 2, 1]
    shuffled = rm.score([prompts[i] for i in perm], [responses[i] for i in perm], batch_size=2)
    assert (shuffled - alone[perm]).abs().max().item() < 1e-5
    seqs = [encode(rm.tok, p, r, rm.max_length) for p, r in TEXTS]
    with torch.no_grad():
        right = rm(*pad_batch(seqs, left=False))
        left = rm(*pad_batch(seqs, left=True))
    assert (right - alone).abs().max().item() < 1e-5 and (left - alone).abs().max().item() < 1e-5
    assert alone.std().item() > 1e-3   # the scores differ between texts: the check is not vacuous


def test_head_init_and_normalizer(rm):
    C = rm.model.config.hidden_size
    assert rm.head.weight.shape == (1, C) and rm.head.bias is None
    assert 0.5 / math.sqrt(C + 1) < rm.head.weight.std().item() < 1.5 / math.sqrt(C + 1)
    assert rm.model.lm_head is None     # a trunk: no output matrix kept
    raw = rm.score(*zip(*TEXTS))
    rm.fit_normalizer([encode(rm.tok, p, r, rm.max_length) for p, r in TEXTS])
    z = rm.score(*zip(*TEXTS), normalize=True)
    assert abs(z.mean().item()) < 1e-5 and abs(z.std().item() - 1) < 1e-4
    assert torch.allclose(raw, rm.score(*zip(*TEXTS)))
    rm.normalizer = {"mean": 0.0, "std": 1.0}


# -----------------------------------------------------------------------------
# training

def tiny_cfg(tmp_path, data, **kw):
    cfg = TrainConfig(data=data, preset="tiny", out=str(tmp_path / "rm"), val_frac=0.2, epochs=2.0, device="cpu")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.slow
def test_training_learns_a_toy_preference(tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(400))
    state = train(tiny_cfg(tmp_path, data))
    assert state["best_accuracy"] >= 0.95
    best = RewardModel.from_pretrained(str(tmp_path / "rm" / "best"))
    held = [json.loads(l) for l in open(tmp_path / "rm" / "metrics.jsonl") if '"val"' in l]
    assert held and held[-1]["accuracy"] >= 0.95
    fresh = toy_pairs(100, seed=99)   # new pairs, never seen
    rc = best.score([p["prompt"] for p in fresh], [p["chosen"] for p in fresh])
    rr = best.score([p["prompt"] for p in fresh], [p["rejected"] for p in fresh])
    assert (rc > rr).float().mean().item() >= 0.95
    assert best.normalizer["std"] > 0 and best.normalizer["n"] == 160


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(200))
    full = train(tiny_cfg(tmp_path / "a", data, eval_every=4, log_every=2))
    part = train(tiny_cfg(tmp_path / "b", data, eval_every=4, log_every=2, stop_after=5))
    assert part["step"] == 5 and not (tmp_path / "b" / "rm" / "best" / "trainer_state.json").exists()
    assert (tmp_path / "b" / "rm" / "last" / "optimizer.safetensors").exists()   # what the resumed run goes on with
    done = train(tiny_cfg(tmp_path / "b", data, eval_every=4, log_every=2))
    assert done["step"] == full["step"] == 10
    assert not (tmp_path / "b" / "rm" / "last" / "optimizer.safetensors").exists()   # the run is over: no moments
    a = RewardModel.from_pretrained(str(tmp_path / "a" / "rm" / "last"))
    b = RewardModel.from_pretrained(str(tmp_path / "b" / "rm" / "last"))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n
    steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "rm" / "metrics.jsonl") if '"train"' in l]
    assert steps == [2, 4, 6, 8, 10]                     # no step logged twice, none missing
    again = train(tiny_cfg(tmp_path / "b", data, eval_every=4, log_every=2))   # finished: nothing more to do
    assert again["step"] == 10
    other = write_jsonl(tmp_path / "other.jsonl", toy_pairs(300, seed=3))       # another run's data: refused
    with pytest.raises(UserError, match="belongs to another run"):
        train(tiny_cfg(tmp_path / "b", other, eval_every=4, log_every=2))


# -----------------------------------------------------------------------------
# transformers parity

@needs_transformers
def test_transformers_gives_the_same_scores(tmp_path, rm):
    torch.manual_seed(1)
    with torch.no_grad():
        rm.head.weight.normal_()   # a head with real spread
    rm.save_pretrained(str(tmp_path / "rm"))
    cfg = json.load(open(tmp_path / "rm" / "config.json"))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] != rm.tok.eos_id
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ours = rm.score(*zip(*TEXTS))
    seqs = [encode(rm.tok, p, r, rm.max_length) for p, r in TEXTS]
    with torch.no_grad():
        alone = torch.cat([hf(torch.tensor([s])).logits[:, 0] for s in seqs])
        idx, mask = pad_batch(seqs, left=False)        # HF finds the last token that is not pad_token_id
        idx[~mask] = cfg["pad_token_id"]
        batched = hf(idx, attention_mask=mask.long()).logits[:, 0]
    assert (alone - ours).abs().max().item() < 1e-4
    assert (batched - ours).abs().max().item() < 1e-4
    back = RewardModel.from_pretrained(str(tmp_path / "rm"))
    assert torch.allclose(back.score(*zip(*TEXTS)), ours, atol=1e-6)


# -----------------------------------------------------------------------------
# bad input

def test_long_texts_are_truncated_with_a_note(rm, capsys):
    long = {"prompt": "Tell me a story.", "chosen": "Lily ran. " * 200 + "The end.", "rejected": "No."}
    keep, rm.max_length = rm.max_length, 128
    try:
        (c, r, _), = tokenize_pairs(rm, [long], "long.jsonl")
    finally:
        rm.max_length = keep
    assert len(c) == 128 and c[-1] == rm.tok.eos_id and len(r) < 128
    assert "long.jsonl: 1 text(s) longer than max_length=128" in capsys.readouterr().err


def test_identical_pairs_are_dropped(rm, capsys):
    pairs = toy_pairs(3) + [{"prompt": "a", "chosen": "same", "rejected": "same"}]
    assert len(tokenize_pairs(rm, pairs, "t.jsonl")) == 3
    assert "identical" in capsys.readouterr().err
    with pytest.raises(UserError, match="identical"):
        tokenize_pairs(rm, pairs[3:], "t.jsonl")


def test_not_a_llama_and_eval_sets_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UserError, match="not a LLaMA"):
        RewardModel.from_pretrained(str(d))
    hhh = os.path.join(ROOT, "data", "almost", "hhh_eval.json")
    with pytest.raises(UserError, match="evaluation set"):
        train(TrainConfig(data=hhh, preset="tiny", out=str(tmp_path / "o")))


@pytest.mark.slow
def test_cli_errors():
    for args, words in [(["eval"], ["unexpected argument 'eval'"]),
                        (["--data=/nonexistent.jsonl", "--preset=tiny"], ["/nonexistent.jsonl", "no such data file"]),
                        (["--bogus=2"], ["unknown flag --bogus"])]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "rm.py"), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert all(w in r.stderr for w in words), r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--rm=/nonexistent/rm"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/nonexistent/rm" in r.stderr, r.stderr


@needs_transformers
def test_parity_on_an_untied_gqa_config_with_biases(tmp_path):
    """A LLaMA unlike the bundled one (untied, GQA, biases, explicit head_dim): a reward model built on it and one
    that transformers saved itself both load and score as transformers does."""
    cfg = transformers.LlamaConfig(vocab_size=600, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                   mlp_bias=True, tie_word_embeddings=False, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    import shutil
    shutil.copy(os.path.join(STORIES, "tokenizer.model"), tmp_path / "base" / "tokenizer.model")
    rm = RewardModel.from_pretrained(str(tmp_path / "base"))
    assert rm.model.lm_head is None
    rm.save_pretrained(str(tmp_path / "rm"))
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    seqs = [encode(rm.tok, p, r, rm.max_length) for p, r in TEXTS]
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[:, 0] for s in seqs])
    assert (rm.score(*zip(*TEXTS)) - ref).abs().max().item() < 1e-4
    # a sequence classifier saved by transformers (random head) loads with its head
    cfg.pad_token_id, cfg.num_labels = 0, 1
    hf2 = transformers.LlamaForSequenceClassification(cfg).eval()
    hf2.save_pretrained(tmp_path / "hf_rm")
    shutil.copy(os.path.join(STORIES, "tokenizer.model"), tmp_path / "hf_rm" / "tokenizer.model")
    rm2 = RewardModel.from_pretrained(str(tmp_path / "hf_rm"))
    with torch.no_grad():
        ref2 = torch.cat([hf2(torch.tensor([s])).logits[:, 0] for s in seqs])
    assert (rm2.score(*zip(*TEXTS)) - ref2).abs().max().item() < 1e-4


# -----------------------------------------------------------------------------
# precision, other families and chat models

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


@pytest.mark.slow
def test_reward_model_on_smollm2_scores_the_same_in_transformers(smollm2, tmp_path):
    """rm.py trains a few steps on SmolLM2; transformers' sequence classifier on the checkpoint gives our scores."""
    transformers = pytest.importorskip("transformers")
    from conftest import toy_pairs, write_jsonl
    from rm import RewardModel, TrainConfig, train
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(12))
    train(TrainConfig(data=data, model=smollm2, out=str(tmp_path / "rm"), max_length=64, batch_size=4,
                      micro_batch=4, epochs=1.0, lr=1e-5, eval_every=2, device="cpu"))
    ours = RewardModel.from_pretrained(str(tmp_path / "rm" / "best"))
    prompts, responses = ["What is a cat?", "Tell me about Paris."], ["A small animal.", "It is in France."]
    scores = ours.score(prompts, responses)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "rm" / "best"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm" / "best"),
                                                                       dtype=torch.float32).eval()
    from tokenizer import format_dialogue
    texts = [format_dialogue(p, r) + hf_tok.eos_token for p, r in zip(prompts, responses)]
    batch = hf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert hf_tok.pad_token_id != hf_tok.eos_token_id
    with torch.no_grad():
        theirs = hf(**batch).logits[:, 0]
    assert torch.allclose(scores, theirs, atol=1e-4), (scores, theirs)


@pytest.mark.slow
def test_reward_model_in_a_chat_template_scores_the_same_in_transformers(tmp_path, chatml_tokenizer):
    """rm.py --chat_template=true: the texts are the chat template's, the flag is saved with the reward model, and
    transformers scores the same text (rendered by its own apply_chat_template) the same."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from conftest import toy_pairs, write_jsonl
    from rm import RewardModel, TrainConfig, train
    base = tiny_bpe_model(tmp_path / "base", chatml_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(10))
    train(TrainConfig(data=data, model=base, out=str(tmp_path / "rm"), max_length=128, batch_size=4, micro_batch=4,
                      epochs=1.0, lr=1e-3, eval_every=1, chat_template=True, device="cpu"))
    ours = RewardModel.from_pretrained(str(tmp_path / "rm" / "best"))
    assert ours.chat and json.load(open(tmp_path / "rm" / "best" / "config.json"))["chat_template"] is True
    scores = ours.score(["What is a cat?", "Hi"], ["A small animal.", "Hello! How can I help?"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "rm" / "best"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm" / "best")).eval()
    texts = [hf_tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                        tokenize=False).rstrip()
             for q, a in [("What is a cat?", "A small animal."), ("Hi", "Hello! How can I help?")]]
    batch = hf_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert hf_tok.pad_token_id != hf_tok.eos_token_id                                 # HF scores the last non-pad token
    with torch.no_grad():
        theirs = hf(**batch).logits[:, 0]
    assert torch.allclose(scores, theirs, atol=1e-4), (scores, theirs)
