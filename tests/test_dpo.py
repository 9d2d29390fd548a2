"""dpo.py: the DPO loss by hand, the summed answer logprobs it reads, the encoding of a pair, on-policy pairs, and the
trainer (the implicit reward's accuracy rising, the reference read back on a resume, two processes against one)."""
import json
import math
import os

import pytest
import torch

from conftest import STORIES, launch, toy_pairs, write_jsonl
from dpo import best_and_worst, dpo_loss, encode, sequence_logprobs
from rm import bt_loss


def test_dpo_loss_by_hand_value_and_gradient():
    """beta 0.5, policy logprobs -1 (chosen) and -2 (rejected), reference -1.5 both: x = 0.5 ((-1 + 2) - 0) = 0.5, the
    loss -log sigmoid(0.5) = 0.474077; d loss / d logp_chosen = -beta sigmoid(-x) = -0.188771, and +0.188771 for the
    rejected; the reference gets no gradient (it is data)."""
    lc, lr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5]), torch.tensor([-1.5])
    loss, r_c, r_r = dpo_loss(lc, lr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), abs=1e-6)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    loss.backward()
    s = 1 / (1 + math.exp(0.5))                                   # sigmoid(-x)
    assert lc.grad.item() == pytest.approx(-0.5 * s, abs=1e-6) and lr.grad.item() == pytest.approx(0.5 * s, abs=1e-6)
    assert r_c.item() == pytest.approx(0.25) and r_r.item() == pytest.approx(-0.25)   # beta (logp - ref)
    assert not r_c.requires_grad


def test_dpo_loss_is_log_2_at_the_reference_and_is_bradley_terry_on_the_implicit_reward():
    """With the policy equal to the reference (the first step), or beta -> 0, every pair's loss is log 2; in general the
    loss is rm.bt_loss on beta (logp - ref), summed."""
    g = torch.Generator().manual_seed(0)
    lc, lr = -10 * torch.rand(6, generator=g), -10 * torch.rand(6, generator=g)
    loss, _, _ = dpo_loss(lc, lr, lc.clone(), lr.clone(), beta=0.1)
    assert loss.item() == pytest.approx(6 * math.log(2), abs=1e-6)
    rc, rr = -10 * torch.rand(6, generator=g), -10 * torch.rand(6, generator=g)
    tiny, _, _ = dpo_loss(lc, lr, rc, rr, beta=1e-7)
    assert tiny.item() == pytest.approx(6 * math.log(2), abs=1e-5)
    loss, _, _ = dpo_loss(lc, lr, rc, rr, beta=0.3)
    assert loss.item() == pytest.approx(bt_loss(0.3 * (lc - rc), 0.3 * (lr - rr), reduction="sum").item(), abs=1e-6)


def test_sequence_logprobs_sum_each_rows_answer_tokens_as_if_alone(stories):
    """Right-padded rows of different lengths: each row's sum equals the log-softmax of a forward of that row alone,
    summed over its answer tokens (each predicted by the position before it), prompt tokens left out."""
    model, _ = stories
    rows = [([1, 400, 401, 260, 300, 12], [False, False, False, True, True, True]),
            ([1, 33, 40, 50], [False, True, True, True]),
            ([1, 7, 8, 9, 10, 11, 12, 13], [False, False, False, False, False, False, True, True])]
    T = max(len(r) for r, _ in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    rmask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, m) in enumerate(rows):
        idx[i, :len(r)], rmask[i, :len(m)] = torch.tensor(r), torch.tensor(m)
    with torch.no_grad():
        got = sequence_logprobs(model, idx, rmask)
        for i, (r, m) in enumerate(rows):
            lp = model(torch.tensor([r])).log_softmax(-1)[0]        # (T, V)
            want = sum(lp[t - 1, r[t]].item() for t in range(1, len(r)) if m[t])
            assert got[i].item() == pytest.approx(want, abs=1e-4)


def test_a_pair_is_encoded_as_the_policy_answers_its_prompt(stories):
    """The ids of an answer are the dialogue's (BOS, the paper's format, the answer, EOS), the prompt's ids (what the
    sampler would continue) a prefix of them; the mask covers exactly the answer and its EOS; a pair past max_length
    is None."""
    from tokenizer import dialogue_ids
    _, tok = stories
    ids, mask = encode(tok, "Tell me about Tom.", "Tom was happy.", 512, False)
    head = dialogue_ids(tok, "Tell me about Tom.")
    assert ids[:len(head)] == head and ids[-1] == tok.eos_id
    assert mask == [False] * len(head) + [True] * (len(ids) - len(head))
    assert tok.decode(ids[len(head):-1]).strip() == "Tom was happy."
    assert encode(tok, "Tell me about Tom.", "Tom was happy.", len(ids) - 1, False) is None


def test_best_and_worst_pairs_the_reward_models_extremes():
    r = {"prompt": "Q?", "answers": ["a", "b", "c", "d"], "scores": [0.1, 2.0, -1.5, 0.3]}
    assert best_and_worst(r) == {"prompt": "Q?", "chosen": "b", "rejected": "c", "margin": 3.5}
    assert best_and_worst({"prompt": "Q?", "answers": ["same", "same"], "scores": [1.0, 0.0]}) is None
    assert best_and_worst({"prompt": "Q?", "answers": ["x", "y"], "scores": [0.5, 0.5]}) is None


# -----------------------------------------------------------------------------
# the trainer

DPO_ARGS = [f"--policy={STORIES}", "--beta=0.5", "--lr=1e-4", "--batch_size=8", "--micro_batch=4", "--epochs=2",
            "--eval_every=5", "--log_every=1", "--max_length=64", "--device=cpu"]


def metrics(path, split="train"):
    return [r for r in map(json.loads, open(path)) if r.get("split") == split]


@pytest.mark.slow
def test_dpo_learns_a_preference_and_resumes_exactly(tmp_path):
    """On toy pairs (the chosen story happy, the rejected sad), from stories260K: at the first step the policy is its
    own reference, so every pair's loss is log 2 and its implicit rewards tie (accuracy 0: ties count as wrong); then
    the implicit reward prefers the chosen answer on the training pairs and the held-out ones, its margin growing.
    A run stopped after 3 steps and resumed (its reference logprobs read back from reference_logprobs.json, the
    policy having moved) ends with the weights of a run that never stopped."""
    from safetensors.torch import load_file
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(80, seed=3))
    launch("dpo.py", [f"--data={data}", *DPO_ARGS, "--out=full"], 1, tmp_path)
    rows = metrics(tmp_path / "full" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(rows[0]["margin"]) < 1e-5
    assert rows[0]["accuracy"] == 0.0
    accuracy, margin = [r["accuracy"] for r in rows], [r["margin"] for r in rows]
    assert min(accuracy[-3:]) >= 0.9 and sum(margin[-3:]) / 3 > 3 * margin[1] > 0, (accuracy, margin)
    assert metrics(tmp_path / "full" / "metrics.jsonl", "val")[-1]["accuracy"] >= 0.9
    launch("dpo.py", [f"--data={data}", *DPO_ARGS, "--out=stopped", "--stop_after=3"], 1, tmp_path)
    assert len(metrics(tmp_path / "stopped" / "metrics.jsonl")) == 3
    launch("dpo.py", [f"--data={data}", *DPO_ARGS, "--out=stopped"], 1, tmp_path)
    a, b = (load_file(tmp_path / d / "last" / "model.safetensors") for d in ("full", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = json.load(open(tmp_path / "stopped" / "reference_logprobs.json"))
    assert ref == json.load(open(tmp_path / "full" / "reference_logprobs.json"))
    from model import load
    model, tok = load(str(tmp_path / "full" / "last"))                  # a complete HF folder with its tokenizer
    assert tok.decode(tok.encode("Tom was happy.")) == "Tom was happy."


@pytest.mark.slow
@pytest.mark.parametrize("scale_flags", [[], ["--fsdp=true", "--grad_checkpointing=true"]], ids=["ddp", "fsdp"])
def test_dpo_on_two_processes_matches_one(tmp_path, scale_flags):
    """The reference logprobs computed in shares and summed, each process's share of every global batch: the weights
    and the logged losses of one process."""
    from safetensors.torch import load_file
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(40, seed=5))
    flags = [f"--data={data}", *DPO_ARGS, "--epochs=1"]
    launch("dpo.py", [*flags, "--out=one"], 1, tmp_path)
    launch("dpo.py", [*flags, "--out=two", *scale_flags], 2, tmp_path)
    one, two = (json.load(open(tmp_path / d / "reference_logprobs.json"))["logprobs"] for d in ("one", "two"))
    assert max(abs(x - y) for a, b in zip(one, two) for x, y in zip(a, b)) < 1e-4
    a, b = (load_file(tmp_path / d / "last" / "model.safetensors") for d in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3e-4
    la, lb = ([r["loss"] for r in metrics(tmp_path / d / "metrics.jsonl")] for d in ("one", "two"))
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.slow
def test_the_chat_profiles_dpo_stage_on_smollm2(tmp_path, smollm2):
    """almost.py's dpo stage with the chat profile on SmolLM2 at small settings: on-policy pairs (the policy's best and
    worst of 4 answers to each RL prompt by a reward model), DPO from the SFT policy (SmolLM2 stands in for it), and a
    DPO policy the evaluation can load."""
    from model import load
    from rm import RewardModel
    out = tmp_path / "out"
    os.makedirs(out / "rm")
    RewardModel.from_pretrained(smollm2, seed=0).save_pretrained(str(out / "rm" / "last"))   # a fresh head will do
    os.makedirs(out / "sft")
    os.symlink(smollm2, out / "sft" / "best")
    write_jsonl(out / "rl_queries.jsonl", [{"id": i, "query": q} for i, q in enumerate(
        ["How do I boil an egg?", "What is the capital of France?", "Name a color.", "Tell me a fact about cats.",
         "What is two plus two?", "Say hello."])])
    r = launch("almost.py", ["--profile=chat", f"--model={smollm2}", f"--out={out}", "--stages=dpo",
                             "--n_rl_queries=6", "--dpo_n=4", "--ppo.max_new_tokens=24", "--dpo.batch_size=2",
                             "--dpo.micro_batch=1", "--dpo.eval_every=1", "--dpo.max_length=256"], 1, tmp_path,
               timeout=900)
    assert "dpo:" in r.stdout, r.stdout[-2000:]
    answers = [json.loads(line) for line in open(out / "dpo_answers.jsonl")]
    assert len(answers) == 6 and all(len(a["answers"]) == 4 and len(a["scores"]) == 4 for a in answers)
    rows = metrics(out / "dpo" / "metrics.jsonl")
    assert rows and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    model, tok = load(str(out / "dpo" / "last"))
    assert model.config.model_type == "llama" and tok.eos_id is not None
