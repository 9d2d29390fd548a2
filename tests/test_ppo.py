"""ppo.py: GAE, masked statistics, reward placement, the KL controller, the first-minibatch sanity, a learnable run, a
reward model of another tokenizer refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ppo
import rm as rmlib
from conftest import ROOT, STORIES, eos_prone_policy, tiny_bpe_model, toy_pairs, write_jsonl
from ppo import (adaptive_kl, entropy_bonus, gae, layout, masked_mean, masked_whiten, missing_eos_scores, ppo_loss,
                 token_rewards)


def prefix_mask(lengths, T):
    return torch.arange(T)[None] < torch.tensor(lengths)[:, None]


def test_gae_equals_a_plain_reverse_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [9, 1, 4, 7, 2]
    mask = prefix_mask(lengths, T)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for b, n in enumerate(lengths):
            a_next = 0.0
            for t in reversed(range(n)):
                v_next = values[b, t + 1].item() if t + 1 < n else 0.0
                delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
                a_next = delta + gamma * lam * a_next
                assert abs(adv[b, t].item() - a_next) < 1e-5
                assert abs(ret[b, t].item() - (a_next + values[b, t].item())) < 1e-5
            assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_masked_statistics_and_one_token_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6) and w[0, 3] == 0
    assert masked_mean(w ** 2, m).item() == pytest.approx(1.0, abs=1e-4)
    keep = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(keep, m).item() == pytest.approx(2.0, abs=1e-5)
    one = torch.tensor([[True, False, False, False]])
    for shift in (True, False):
        out = masked_whiten(x, one, shift_mean=shift)
        assert torch.isfinite(out).all() and out[0, 1:].abs().sum() == 0
    assert masked_whiten(x, one)[0, 0] == 0


def test_score_lands_on_the_last_real_response_token():
    """Left-padded prompts of different lengths and responses that stop early: the score is added at each row's
    last response token (its EOS), nowhere else."""
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    responses = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 27]]   # the last one never stopped
    idx, mask, rmask, P = layout(prompts, responses)
    assert P == 5 and idx[1, :3].tolist() == [0, 0, 0] and idx[1, 3:5].tolist() == [1, 7]
    assert rmask.sum(-1).tolist() == [3, 2, 5] and idx[0, P:P + 3].tolist() == [20, 21, 2]
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    score = torch.tensor([10.0, 20.0, 30.0])
    rewards, non_score = token_rewards(score, logp, ref, rmask, beta=0.1)
    placed = rewards - non_score
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 1], expected[2, 4] = 10.0, 20.0, 30.0
    assert torch.allclose(placed, expected)
    assert torch.allclose(non_score, -0.1 * (logp - ref) * rmask)


def test_ppo_loss_by_hand():
    """Two rows; the second's last token is padding (garbage that must not count). clip 0.2, value clip 0.2."""
    log = torch.tensor([1.5, 0.5]).log()
    logp = torch.tensor([[0.0, log[0]], [log[1], 9.0]])          # ratios 1, 1.5 | 0.5, (padding)
    old_logp = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 2.0], [-1.0, 7.0]])
    values, old_values = torch.tensor([[1.0, 0.5], [0.1, 5.0]]), torch.zeros(2, 2)
    returns = torch.tensor([[1.0, 1.0], [-1.0, 3.0]])
    mask = torch.tensor([[True, True], [True, False]])
    pl, vl, ratio = ppo_loss(logp, old_logp, values, old_values, adv, returns, mask, 3, 0.2, 0.2)
    # policy terms max(-A r, -A clip(r)): (-1, -1) -> -1; (-3, -2.4) -> -2.4; (0.5, 0.8) -> 0.8
    assert pl.item() == pytest.approx((-1 - 2.4 + 0.8) / 3)
    # value terms: V_clip = (0.2, 0.2 | 0.1); max((V-R)^2, (V_clip-R)^2) = (0.64, 0.64 | 1.21)
    assert vl.item() == pytest.approx(0.5 * (0.64 + 0.64 + 1.21) / 3)
    assert torch.allclose(ratio[mask], torch.tensor([1.0, 1.5, 0.5]))
    pl6, vl6, _ = ppo_loss(logp, old_logp, values, old_values, adv, returns, mask, 6, 0.2, 0.2)
    assert (pl6.item(), vl6.item()) == pytest.approx((pl.item() / 2, vl.item() / 2))   # divided by the global count
    # the gradient reaches only the valid tokens
    logp.requires_grad_(True)
    ppo_loss(logp, old_logp, values, old_values, adv, returns, mask, 3)[0].backward()
    assert logp.grad[1, 1] == 0 and logp.grad[0, 0] != 0 and logp.grad[0, 1] == 0   # token 2 is clipped: no gradient


def test_entropy_bonus_by_hand():
    """The entropy summed over the valid tokens over the global token count (padding's 99 never counts), with its
    gradient: the loss subtracts ent_coef times it, so every valid token's entropy is pushed up by ent_coef / n."""
    entropy = torch.tensor([[1.0, 2.0], [3.0, 99.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    bonus = entropy_bonus(entropy, mask, 3)
    assert bonus.item() == pytest.approx((1 + 2 + 3) / 3)
    (-0.1 * bonus).backward()
    assert torch.allclose(entropy.grad, -0.1 / 3 * mask.float())


def test_adaptive_kl_formula():
    assert adaptive_kl(0.05, 6.0, 6.0, 10000, 64) == pytest.approx(0.05)
    assert adaptive_kl(0.05, 9.0, 6.0, 10000, 64) == pytest.approx(0.05 * (1 + 0.2 * 64 / 10000))  # 0.5 clipped to 0.2
    assert adaptive_kl(0.05, 6.6, 6.0, 10000, 64) == pytest.approx(0.05 * (1 + 0.1 * 64 / 10000))
    assert adaptive_kl(0.05, 0.0, 6.0, 10000, 64) == pytest.approx(0.05 * (1 - 0.2 * 64 / 10000))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A reward model that prefers happy stories (learnable), and story prompts."""
    d = tmp_path_factory.mktemp("ppo")
    data = write_jsonl(d / "toy.jsonl", toy_pairs(400))
    rmlib.train(rmlib.TrainConfig(data=data, preset="tiny", out=str(d / "rm"), val_frac=0.2, epochs=2.0, device="cpu"))
    write_jsonl(d / "prompts.jsonl", [{"query": p["prompt"]} for p in toy_pairs(200, seed=5)])
    return d


def toy_cfg(d, out, **kw):
    cfg = ppo.Config(policy=STORIES, rm=str(d / "rm" / "best"), prompts=str(d / "prompts.jsonl"), out=str(out),
                     batch_size=16, minibatch=8, max_new_tokens=24, lr=5e-4, value_lr=1e-3, beta=0.1,
                     penalize_missing_eos=False, device="cpu", samples_per_log=0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_first_minibatch_is_on_policy_and_resume_continues(toy, tmp_path, capsys):
    out = tmp_path / "run"
    ppo.train(toy_cfg(toy, out, steps=2, save_every=1))
    # the run's final checkpoint leaves out the optimizer moments (nothing resumes from them): a longer run goes on
    # from it with fresh ones, and says so
    assert not list((out / "last").glob("*/optimizer.safetensors"))
    rows = metrics(out)
    for r in rows:
        f = r["first_minibatch"]
        assert abs(f["ratio"] - 1) < 1e-6 and f["approx_kl"] < 1e-10 and f["clipfrac"] == 0 and f["value_clipfrac"] == 0
        assert r["rollout_logprob_mismatch"] < 1e-4      # the sampler's logprobs = the training forward's
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6)  # the policy starts as the reference
    capsys.readouterr()
    state = ppo.train(toy_cfg(toy, out, steps=3, save_every=1))
    assert state["step"] == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert "holds no optimizer moments: the steps from here start fresh ones" in capsys.readouterr().out
    from model import Llama
    Llama.from_pretrained(str(out / "last" / "policy"))
    rmlib.RewardModel.from_pretrained(str(out / "last" / "value"))
    # --resume=false starts over from the SFT policy, as in every trainer
    state = ppo.train(toy_cfg(toy, out, steps=1, save_every=1, resume=False))
    assert state["step"] == 1 and [r["step"] for r in metrics(out)] == [1]
    assert metrics(out)[0]["kl"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_ppo_raises_a_learnable_reward_with_bounded_kl_and_a_value_model_that_fits(toy, tmp_path):
    """40 steps against a reward model that prefers happy stories. Each check is a property, or has a margin from
    measurements over seeds 1337, 1 and 2 with one and two torch threads (other orders of float sums), not one
    machine's trajectory:
    - the reward rises clear of its step-to-step noise: the Welch interval of the last 8 steps' mean score against the
      first 8's lies above 0 (the report's own verdict; lower edges 0.07-0.20 measured);
    - KL is exactly 0 at step 1 (the reference is the policy then) and well away from 0 later (a reference that moved
      with the policy would read 0; the last 10 steps' least KL measured 16-22 nats, the bar 5);
    - the KL penalty holds the KL: over steps 16-20 it is under 0.6 of the KL of the same run without the penalty
      (beta 0), measured 0.35-0.40 (19-23 nats against 56);
    - the value model fits the returns: explained variance over the last 10 steps above 0.4 and 0.3 above its first 3
      steps' (measured 0.66-0.84, and 0.79-1.31 above)."""
    from eval import difference_interval
    out = tmp_path / "learn"
    ppo.train(toy_cfg(toy, out, steps=40, save_every=100))
    rows = metrics(out)
    score = [r["rm_score_mean"] for r in rows]
    rise, (lo, hi) = difference_interval(score[:8], score[-8:])
    assert lo > 0, (rise, lo, hi, score)
    kl = [r["kl"] for r in rows]
    assert kl[0] == pytest.approx(0, abs=1e-6) and min(kl[-10:]) > 5, kl
    ppo.train(toy_cfg(toy, tmp_path / "free", steps=20, save_every=100, beta=0.0, adaptive_kl=False))
    free = [r["kl"] for r in metrics(tmp_path / "free")]
    assert sum(kl[15:20]) < 0.6 * sum(free[15:20]), (kl, free)
    ev = [r["explained_variance"] for r in rows]
    assert sum(ev[-10:]) / 10 > 0.4 and sum(ev[-10:]) / 10 > sum(ev[:3]) / 3 + 0.3, ev


@pytest.mark.slow
def test_cli_errors(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    from rm import RewardModel
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"query": "ok"}\nnot json\n')
    rm = tmp_path / "rm"
    RewardModel.from_pretrained(STORIES).save_pretrained(str(rm))
    for args, words in [([], ["--policy is required"]),
                        ([f"--policy={STORIES}", f"--rm={rm}", "--prompts=/nonexistent.jsonl"], ["/nonexistent.jsonl"]),
                        ([f"--policy={STORIES}", f"--rm={rm}", f"--prompts={bad}"], [f"{bad}:2"]),
                        ([f"--policy={STORIES}", f"--rm={STORIES}", f"--prompts={bad}"], ["not a reward model"]),
                        (["--clip=wide"], ["--clip", "float"])]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "ppo.py"), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert all(w in r.stderr for w in words), r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags", [{}, {"dtype": "bf16"}, {"lora_rank": 4}], ids=["fp32", "bf16-autocast", "lora"])
def test_the_reference_starts_at_kl_zero(toy, tmp_path, flags):
    """At step 1 the policy is the SFT policy, so KL(policy || reference) must be exactly 0 in every precision and
    layout. (With the reference stored in bf16 beside fp32 masters under bf16 autocast it was 0.04 nats and more.)"""
    ppo.train(toy_cfg(toy, tmp_path / "run", steps=1, batch_size=4, minibatch=4, ppo_epochs=1, max_new_tokens=8,
                      **flags))
    rec = metrics(tmp_path / "run")[0]
    assert rec["kl"] == pytest.approx(0, abs=1e-6) and rec["non_score_reward"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_a_fresh_value_model_predicts_the_normalised_score(toy, tmp_path):
    """The value model starts from the reward model, and the returns it learns are sums of the normalised score:
    at step 0 its value at a response's last token is the reward model's normalised score of that very dialogue
    (read, as the reward model reads it, without BOS). The toy reward model's normaliser is far from (0, 1), so a
    value model left on the raw scale fails by several units."""
    from model import last_token_index
    from tokenizer import Tokenizer, dialogue_ids
    cfg = toy_cfg(toy, tmp_path / "run")
    tok = Tokenizer(STORIES)
    models, *_ = ppo.load_models(cfg, tok, torch.device("cpu"), torch.float32, str(tmp_path / "no"))
    value, reward_model = models.value, models.reward_model
    n = reward_model.normalizer
    assert abs(n["mean"]) > 0.1 or abs(n["std"] - 1) > 0.1, n
    prompts = [dialogue_ids(tok, "Tell me about Lily and the dog."), dialogue_ids(tok, "Tom")]
    responses = [tok.encode(" Lily was happy.") + [tok.eos_id], tok.encode(" Tom was very sad all day.")]
    idx, mask, rmask, P = layout(prompts, responses)
    vmask = ppo.without_bos(idx, mask, P, tok.bos_id)
    with torch.no_grad():   # the head on every position, on the value model's scale (values_of's slice of it)
        full = (value(idx, vmask, per_token=True) - value.normalizer["mean"]) / value.normalizer["std"]
        assert torch.equal(ppo.values_of(value, idx, vmask, P), full[:, P - 1:-1])
    last = full[torch.arange(2), last_token_index(mask)]
    expected = reward_model.score_ids([p[1:] + r for p, r in zip(prompts, responses)], normalize=True)
    assert torch.allclose(last, expected, atol=1e-5), (last, expected)
    # a saved (and resumed) value model keeps its folded head and its normaliser (mean / std, 1)
    value.save_pretrained(str(tmp_path / "value"))
    again = rmlib.RewardModel.from_pretrained(str(tmp_path / "value"))
    assert again.normalizer == value.normalizer
    with torch.no_grad():
        assert torch.allclose(ppo.values_of(again, idx, vmask, P), full[:, P - 1:-1], atol=1e-6)


@pytest.mark.slow
def test_the_entropy_bonus_reaches_the_policy_update(toy, tmp_path, monkeypatch):
    """--ent_coef: each minibatch's loss subtracts ent_coef x entropy_bonus of the policy's entropy, with its gradient,
    so the same rollout gives another update; --ent_coef=0 (the default) never computes it and keeps the update."""
    from safetensors.torch import load_file
    calls = []

    def spy(entropy, mask, n_tokens):
        out = entropy_bonus(entropy, mask, n_tokens)
        calls.append(out.requires_grad)
        return out
    monkeypatch.setattr(ppo, "entropy_bonus", spy)
    weights = {}
    for coef in (0.0, 0.5):
        calls.clear()
        out = tmp_path / f"run{coef}"
        ppo.train(toy_cfg(toy, out, steps=1, batch_size=8, minibatch=4, ppo_epochs=1, max_new_tokens=12,
                          ent_coef=coef, save_every=1))
        assert calls == ([] if coef == 0 else [True, True])   # once a minibatch, with its graph
        weights[coef] = load_file(str(out / "last" / "policy" / "model.safetensors"))
    assert any(not torch.equal(weights[0.0][k], weights[0.5][k]) for k in weights[0.0])


@pytest.mark.slow
def test_missing_eos_penalty_replaces_the_score_of_a_response_that_never_ended(toy, tmp_path, monkeypatch):
    """A response cut at max_new_tokens gets --missing_eos_penalty as its score; one that ended keeps the reward
    model's. By hand, then inside a PPO step (the paper profile's default), on a policy that ends about a third of
    its rollouts at each step, so the batch holds both kinds; the step's logged score is the penalised one."""
    assert missing_eos_scores(torch.tensor([0.5, 2.0, -3.0]), [True, False, True], -1.0).tolist() == [0.5, -1.0, -3.0]
    seen = []

    def spy(score, ended, penalty):
        out = missing_eos_scores(score, ended, penalty)
        seen.append((score.clone(), list(ended), out.clone()))
        return out
    monkeypatch.setattr(ppo, "missing_eos_scores", spy)
    cfg = toy_cfg(toy, tmp_path / "run", policy=eos_prone_policy(tmp_path / "policy"), steps=1, batch_size=8,
                  minibatch=8, ppo_epochs=1, max_new_tokens=12, penalize_missing_eos=True, missing_eos_penalty=-3.0)
    ppo.train(cfg)
    (raw, ended, out), = seen
    assert True in ended and False in ended, ended
    for r, e, o in zip(raw.tolist(), ended, out.tolist()):
        assert o == (r if e else -3.0)
    rec = metrics(tmp_path / "run")[0]
    assert rec["eos_rate"] == pytest.approx(sum(ended) / 8) and rec["score_mean"] == pytest.approx(out.mean().item())
    assert rec["rm_score_mean"] == pytest.approx(raw.mean().item())


@pytest.mark.slow
def test_trim_cut_scores_a_truncated_response_back_to_its_last_sentence(toy, tmp_path, monkeypatch):
    """--trim_cut: the reward model reads a response that hit the token budget back to its last full sentence (the
    story profile's answers went through that rule before the reward model was trained on them); a response that
    ended with EOS is read whole; without the flag every response is read as sampled. Both kinds in one batch, on a
    policy that ends about a third of its rollouts."""
    from tokenizer import trim_to_sentence
    assert trim_to_sentence('He ran. She said, "Stop." Then the dog') == "He ran."
    assert trim_to_sentence("no sentence ends here") == "no sentence ends here"
    seen = []
    real = rmlib.RewardModel.score

    def spy(self, prompts, responses, *a, **k):
        seen.append(list(responses))
        return real(self, prompts, responses, *a, **k)
    monkeypatch.setattr(rmlib.RewardModel, "score", spy)
    policy = eos_prone_policy(tmp_path / "policy")
    runs = {}
    for trim in (True, False):
        seen.clear()
        batches = []
        monkeypatch.setattr(ppo, "score_rollout", lambda *a, _real=ppo.score_rollout, **k: batches.append(a[1]) or
                            _real(*a, **k))
        ppo.train(toy_cfg(toy, tmp_path / f"run{trim}", policy=policy, steps=1, batch_size=8, minibatch=8,
                          ppo_epochs=1, max_new_tokens=48, trim_cut=trim))
        monkeypatch.undo()
        monkeypatch.setattr(rmlib.RewardModel, "score", spy)
        (b,), (scored,) = batches, seen
        runs[trim] = (b.texts, b.ended, scored)
    texts, ended, scored = runs[True]
    assert True in ended and False in ended, ended
    assert any(trim_to_sentence(t) != t for t, e in zip(texts, ended) if not e), texts   # some cut mid-sentence
    assert scored == [t if e else trim_to_sentence(t) for t, e in zip(texts, ended)]
    texts, ended, scored = runs[False]
    assert scored == texts
    rec = metrics(tmp_path / "runTrue")[0]
    texts, _, scored = runs[True]
    assert rec["trimmed_share"] == pytest.approx(sum(1 - len(s) / len(t) for s, t in zip(scored, texts) if t) / 8)
    assert 0 < rec["trimmed_share"] < 1 and "trimmed_share" not in metrics(tmp_path / "runFalse")[0]
    with pytest.raises(ppo.UserError, match="--trim_cut"):
        ppo.check_config(toy_cfg(toy, tmp_path / "x", trim_cut=True, penalize_missing_eos=True))


@pytest.mark.slow
def test_ppo_refuses_a_reward_model_with_another_tokenizer(tmp_path, chatml_tokenizer):
    """The value model starts from the reward model and reads the policy's ids: their tokenizers must agree."""
    from rm import RewardModel
    d = tiny_bpe_model(tmp_path / "other", chatml_tokenizer)
    RewardModel.from_pretrained(d).save_pretrained(str(tmp_path / "rm"))
    (tmp_path / "prompts.txt").write_text("Tell me a story.\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "ppo.py"), f"--policy={STORIES}", f"--rm={tmp_path / 'rm'}",
                        f"--prompts={tmp_path / 'prompts.txt'}", f"--out={tmp_path / 'ppo'}", "--device=cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "tokenizer differs from the policy's" in r.stderr and str(tmp_path / "rm") in r.stderr
