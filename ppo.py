"""
PPO with GAE, from scratch: ALMoST step 3, RL from synthetic feedback. The checklist of RLHF_NOTES.md, item by item
(the numbers in the comments below).

    python ppo.py --policy=out/sft/best --rm=out/rm/best --prompts=out/queries.jsonl --out=out/ppo

Per step: sample a rollout batch from the policy with THE sampler (1), recompute the logprobs of the policy and the
frozen reference (the SFT policy) and the values with the training forward on the same token layout (3), build
per-token rewards -beta * (logp - logp_ref) with the reward model's score (normalised) at the last real response
token (6), GAE backwards over the response (8), whiten the advantages (7), then ppo_epochs passes of minibatches
over fresh permutations with the clipped policy and value losses (9, 10, 11), and update beta (12). Every metric of
item 13 goes to metrics.jsonl; checkpoints are HF folders (policy: LlamaForCausalLM, value:
LlamaForSequenceClassification) and a rerun resumes.
"""
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from model import Llama, Tokenizer, UserError, commit_dir, last_token_index, lora_disabled, rank
from rm import (RewardModel, ScaleConfig, all_sum, autocast, clip_grads, compute_dtype, describe, end_distributed,
                format_dialogue, load_dtype, lora_key, make_optimizer, memory_dry_run, prepare_for_training,
                save_training_checkpoint, setup_distributed, start_or_resume, sync_grads)
from sample import PAD_ID, generate, parse_args, run_cli


# -----------------------------------------------------------------------------
# masked statistics and GAE (the public helpers)

def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is True (all of them, or along dim)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over valid positions (7); shift_mean=False keeps the mean (for rewards). With one valid
    token there is no spread to divide by: x is only centred (or returned unchanged). Invalid positions -> 0.
    Under torchrun the mean and std are those of every process's rows (the global batch)."""
    m = mask.to(x.dtype)
    n, total = all_sum([m.sum().item(), (x * m).sum().item()])
    mean = total / max(n, 1)
    if n <= 1:
        out = x - mean if shift_mean else x
    else:
        var = all_sum([(((x - mean) ** 2) * m).sum().item()])[0] / n    # population variance, two passes
        out = (x - mean) * (var + 1e-8) ** -0.5
        if not shift_mean:
            out = out + mean
    return out * mask


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (8) on (B, T) tensors whose mask marks each row's response tokens (a
    prefix of the row). Backwards: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V
    and A past the last token 0. Returns (advantages, returns = A + V), both 0 off the mask, detached."""
    rewards, values, m = rewards.detach(), values.detach(), mask.to(rewards.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_v = values[:, t + 1] * next_m if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * next_m * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def token_rewards(score, logp, ref_logp, mask, beta):
    """Per-token rewards (6): -beta * (logp - logp_ref) on every response token, plus the sequence score at the
    last real response token (the EOS when there is one). Returns (rewards, non_score part)."""
    kl = (logp - ref_logp) * mask
    non_score = -beta * kl
    rewards = non_score.clone()
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last_token_index(mask)] += score
    return rewards, non_score


def adaptive_kl(beta, kl, target, horizon, n):
    """Ziegler et al. 2019 (12): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""
    err = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + err * n / horizon)


# -----------------------------------------------------------------------------
# config

@dataclass
class Config(ScaleConfig):   # device, dtype, LoRA, gradient checkpointing, FSDP: see rm.py
    policy: str = ""               # the SFT policy (HF LLaMA folder); also the frozen reference
    rm: str = ""                   # the reward model; the value model starts from it (head re-used)
    prompts: str = ""              # .jsonl with "query" (or "prompt") fields, or .txt with one prompt a line
    out: str = "out/ppo"
    steps: int = 100               # rollout batches
    batch_size: int = 16           # episodes per rollout batch
    minibatch: int = 4
    ppo_epochs: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0       # rollouts sample at T with top-k 0 and top-p 1 (1)
    lr: float = 1e-5
    value_lr: float = 1e-5
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5           # scales the value loss (separate optimizer, but reported together)
    beta: float = 0.05             # initial KL coefficient
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_rewards: bool = False
    missing_eos_penalty: float = -1.0   # the score of a response that never emits EOS (5)
    penalize_missing_eos: bool = True   # False: a truncated response keeps its RM score (marked truncated in eos_rate)
    grad_clip: float = 1.0
    log_every: int = 1
    save_every: int = 10
    samples_per_log: int = 2
    seed: int = 1337


def read_prompts(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such prompts file. Give a .jsonl with \"query\" fields or a .txt, one a line.")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    d = json.loads(line)
                    out.append(d.get("query", d.get("prompt")))
                except (json.JSONDecodeError, AttributeError):
                    raise UserError(f"{path}:{i}: not a JSON object with a \"query\" field.") from None
                if not isinstance(out[-1], str):
                    raise UserError(f"{path}:{i}: no string \"query\" (or \"prompt\") field.")
            else:
                out.append(line.rstrip("\n"))
    if not out:
        raise UserError(f"{path}: no prompts.")
    return out


# -----------------------------------------------------------------------------
# the models' forward on a rollout: one layout for every pass (3)

def layout(prompts, responses):
    """Left-padded prompts then right-padded responses: ids (B, P+R), mask (B, P+R), response mask (B, R)."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    B = len(prompts)
    idx = torch.full((B, P + R), PAD_ID, dtype=torch.long)
    mask = torch.zeros(B, P + R, dtype=torch.bool)
    rmask = torch.zeros(B, R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        idx[i, P - len(p):P] = torch.tensor(p)
        idx[i, P:P + len(r)] = torch.tensor(r)
        mask[i, P - len(p):P + len(r)] = True
        rmask[i, :len(r)] = True
    return idx, mask, rmask, P


def logprobs_of(model, idx, mask, P, temperature):
    """Logprobs (B, R) of the response tokens under softmax(logits / T), and the entropy of that distribution."""
    logits = model(idx, mask=mask)[:, P - 1:-1] / temperature               # (B, R, V): position t predicts t+1
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, idx[:, P:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def values_of(value_model, idx, mask, P):
    """Per-token values (B, R): the value head on the state that emits each response token."""
    return value_model(idx, mask, per_token=True)[:, P - 1:-1]


# -----------------------------------------------------------------------------
# training

def save_checkpoint(path, policy, tok, value, opts, params, state):
    """policy/, value/ and state in one folder, swapped in atomically (a crash never leaves a mixed checkpoint).
    Every process calls this (FSDP gathers its shards); process 0 writes."""
    tmp = path + ".new"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    save_training_checkpoint(lambda p, files: policy.save_pretrained(p, files={"tokenizer.model": tok.save, **files}),
                             params[0], opts[0], os.path.join(tmp, "policy"), state, policy)
    save_training_checkpoint(value.save_pretrained, params[1], opts[1], os.path.join(tmp, "value"), state, value)
    if rank() == 0:
        commit_dir(tmp, path)


def row_seed(seed, step, row):
    """The sampler seed of one rollout row: a row samples the same on any number of processes."""
    return ((seed * 1_000_003 + step) * 1_000_003 + row) % 2**63


def dry_run(cfg):
    """The memory plan of this run: rollout rows batch_size / world, minibatch / world rows per training forward of
    prompt + max_new_tokens tokens (the longest prompt, when the prompts and the policy's tokenizer are at hand)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prompt = 256
    if os.path.isfile(cfg.prompts) and os.path.isfile(os.path.join(cfg.policy, "tokenizer.model")):
        tok = Tokenizer(cfg.policy)
        prompt = max(len(tok.encode(format_dialogue(p), bos=True)) for p in read_prompts(cfg.prompts))
    elif rank() == 0:
        print(f"(prompt length taken as {prompt} tokens: --prompts or the policy's tokenizer is not at hand)")
    return memory_dry_run(cfg, cfg.policy, "ppo", max(1, cfg.minibatch // world), prompt + cfg.max_new_tokens,
                          rollout_rows=max(1, cfg.batch_size // world), response=cfg.max_new_tokens)


def train(cfg):
    for k in ("policy",) if cfg.dry_run else ("policy", "rm", "prompts"):
        if not getattr(cfg, k):
            raise UserError(f"--{k} is required (python ppo.py --policy=SFT_FOLDER --rm=RM_FOLDER --prompts=FILE).")
    if cfg.batch_size % cfg.minibatch:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of --minibatch={cfg.minibatch}.")
    if cfg.temperature <= 0:
        raise UserError("--temperature must be > 0: PPO needs a sampling distribution.")
    if cfg.dry_run:
        return dry_run(cfg)
    r0, world, dev = setup_distributed(cfg.device)
    if cfg.minibatch % world:
        raise UserError(f"--minibatch={cfg.minibatch} (and --batch_size) must be a multiple of the {world} processes.")
    dtype = compute_dtype(cfg, dev)
    main = r0 == 0
    prompts_text = read_prompts(cfg.prompts)
    last = os.path.join(cfg.out, "last")
    resuming = os.path.isfile(os.path.join(last, "policy", "trainer_state.json"))
    lora = cfg.lora_rank > 0
    # trained models: fp32 masters, or (LoRA) a frozen base in the compute dtype whose adapters are trained. A full
    # run resumes from last/'s weights; a LoRA run from its bases plus last/'s adapters and value head.
    policy = Llama.from_pretrained(os.path.join(last, "policy") if resuming and not lora else cfg.policy,
                                   device=dev, dtype=load_dtype(cfg, dtype))
    value = RewardModel.from_pretrained(os.path.join(last, "value") if resuming and not lora else cfg.rm,
                                        device=dev, dtype=load_dtype(cfg, dtype))
    tok = Tokenizer(cfg.policy)
    if lora and not cfg.fsdp:
        # one copy of each 7B trunk: the reference is the policy with its adapters off (14), the reward model the
        # value trunk with its adapters off and the RM's own head
        ref = None
        rm = RewardModel(value.model, value.tok, value.max_length)
        rm.head.weight = torch.nn.Parameter(value.head.weight.detach().clone().to(dtype), requires_grad=False)
        rm.normalizer = value.normalizer
    else:
        ref = Llama.from_pretrained(cfg.policy, device=dev, dtype=dtype).requires_grad_(False)   # frozen SFT (14)
        rm = RewardModel.from_pretrained(cfg.rm, device=dev, dtype=dtype).requires_grad_(False)
    p_params = prepare_for_training(policy, cfg, dtype, seed=cfg.seed,
                                    trained_from=os.path.join(last, "policy") if resuming and lora else None)
    v_params = prepare_for_training(value, cfg, dtype, heads=[value.head], seed=cfg.seed + 1,
                                    trained_from=os.path.join(last, "value") if resuming and lora else None)
    for m in (policy, ref, rm, value):
        if m is not None:
            m.eval()   # (2) no dropout anywhere; LLaMA has none, and eval() keeps it that way
    opt_p, opt_v = make_optimizer(policy, cfg.lr, 0.0), make_optimizer(value, cfg.value_lr, 0.0)
    state = {"step": 0, "beta": cfg.beta}
    run = {"policy": os.path.abspath(cfg.policy), "rm": os.path.abspath(cfg.rm), "lora": lora_key(cfg)}
    loads = [(p_params, opt_p, os.path.join(last, "policy")), (v_params, opt_v, os.path.join(last, "value"))]
    state = start_or_resume(cfg.out, os.path.join(last, "policy"), state, run, loads if resuming else [])
    if main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        print(f"ppo: {cfg.batch_size} episodes a step over {world} process(es); {dev} "
              f"{str(dtype).removeprefix('torch.')}; policy: {describe(p_params, policy, cfg)}; value: "
              f"{describe(v_params, value, cfg)}")
    eos = tok.eos_id
    ctx = policy.config.max_position_embeddings
    prompt_ids = [tok.encode(format_dialogue(p), bos=True) for p in prompts_text]
    too_long = [i for i, p in enumerate(prompt_ids) if len(p) + cfg.max_new_tokens > ctx]
    if too_long:
        if main:
            print(f"note: {len(too_long)} prompt(s) of {cfg.prompts} leave no room for {cfg.max_new_tokens} new "
                  f"tokens in the {ctx}-token context; they are skipped", file=sys.stderr)
        prompt_ids = [p for i, p in enumerate(prompt_ids) if i not in set(too_long)]
        prompts_text = [p for i, p in enumerate(prompts_text) if i not in set(too_long)]
    if not prompt_ids:
        raise UserError(f"{cfg.prompts}: no prompt fits the context window with --max_new_tokens={cfg.max_new_tokens}.")
    if len(prompt_ids) < cfg.batch_size and main:
        print(f"note: {len(prompt_ids)} prompts < --batch_size={cfg.batch_size}: each batch draws them with "
              f"replacement", file=sys.stderr)

    def log(rec):
        if main:
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    B = cfg.batch_size // world                  # this process's rollout rows; it owns rows [r0 * B, (r0 + 1) * B)
    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc="ppo", dynamic_ncols=True,
               disable=not main)
    for step in bar:
        t0 = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 100003 + step)     # everything random follows (seed, step)
        if len(prompt_ids) >= cfg.batch_size:
            pick = torch.randperm(len(prompt_ids), generator=g)[:cfg.batch_size].tolist()
        else:
            pick = torch.randint(len(prompt_ids), (cfg.batch_size,), generator=g).tolist()
        rows = range(r0 * B, (r0 + 1) * B)
        pick = [pick[j] for j in rows]
        batch_prompts = [prompt_ids[i] for i in pick]

        # rollout (1, 5): THE sampler, stopping at EOS; the EOS is part of the response
        policy.eval()
        with autocast(dev, dtype):
            toks, sampled_lp = generate(policy, batch_prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                                        top_k=0, top_p=1.0, stop_ids=[eos],
                                        seed=[row_seed(cfg.seed, step, j) for j in rows])
        t_gen = time.time() - t0
        ended = [len(t) < cfg.max_new_tokens for t in toks]
        responses = [t + [eos] if e else t for t, e in zip(toks, ended)]
        responses = [r if r else [eos] for r in responses]
        idx, mask, rmask, P = layout(batch_prompts, responses)
        idx, mask, rmask = idx.to(dev), mask.to(dev), rmask.to(dev)

        with torch.no_grad(), autocast(dev, dtype):
            # in minibatch-sized chunks, so the (rows, T, vocab) logits never exceed the training step's
            chunks = [slice(i, i + cfg.minibatch // world) for i in range(0, B, cfg.minibatch // world)]
            old_logp = torch.cat([logprobs_of(policy, idx[c], mask[c], P, cfg.temperature)[0] for c in chunks])
            with lora_disabled(policy) if ref is None else contextlib.nullcontext():
                ref_logp = torch.cat([logprobs_of(policy if ref is None else ref, idx[c], mask[c], P, cfg.temperature)[0]
                                      for c in chunks])                      # same T for the reference (1)
            old_values = torch.cat([values_of(value, idx[c], mask[c], P) for c in chunks])
            texts = [tok.decode(t) for t in toks]
            with lora_disabled(rm):
                raw = rm.score([prompts_text[i] for i in pick], texts, normalize=True).to(dev)
            score = raw
            if cfg.penalize_missing_eos:                                          # (5)
                score = torch.where(torch.tensor(ended, device=dev), raw, torch.full_like(raw, cfg.missing_eos_penalty))
            mismatch = max((abs(a - b) for t, s, row in zip(toks, sampled_lp, old_logp.tolist())
                            for a, b in zip(s, row[:len(t)])), default=0.0)
            rewards, non_score = token_rewards(score, old_logp, ref_logp, rmask, state["beta"])
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, rmask, shift_mean=False)
            adv, returns = gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)   # returns before whitening (8)
            adv = masked_whiten(adv, rmask)                                     # over the global batch

        # PPO epochs (9-11). A global minibatch is minibatch / world rows of every process; each process's loss is
        # its tokens' sum over the global minibatch's token count, and sync_grads sums the gradients.
        policy.train()
        value.train()
        mstats, first = [], None
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=g)
            for mb in perm.split(cfg.minibatch // world):
                mb = mb.to(dev)
                m = rmask[mb]
                n_tok, = all_sum([m.sum().item()])
                with autocast(dev, dtype):
                    logp, ent = logprobs_of(policy, idx[mb], mask[mb], P, cfg.temperature)
                    v = values_of(value, idx[mb], mask[mb], P)
                ratio = torch.exp(logp - old_logp[mb])
                a = adv[mb]
                pg = (torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)) * m).sum() / n_tok
                v_old = old_values[mb]
                v_clip = v_old + (v - v_old).clamp(-cfg.value_clip, cfg.value_clip)
                vf = 0.5 * (torch.max((v - returns[mb]) ** 2, (v_clip - returns[mb]) ** 2) * m).sum() / n_tok
                (pg + cfg.vf_coef * vf).backward()
                sync_grads(p_params, cfg)
                sync_grads(v_params, cfg)
                clip_grads(p_params, cfg.grad_clip)
                clip_grads(v_params, cfg.grad_clip)
                opt_p.step()
                opt_v.step()
                opt_p.zero_grad(set_to_none=True)
                opt_v.zero_grad(set_to_none=True)
                with torch.no_grad():   # this process's share of the minibatch
                    share = n_tok / max(m.sum().item(), 1)
                    s = {"policy_loss": pg.item() * share, "value_loss": vf.item() * share,
                         "ratio": masked_mean(ratio, m).item(),
                         "approx_kl": masked_mean(0.5 * (logp - old_logp[mb]) ** 2, m).item(),
                         "clipfrac": masked_mean(((ratio - 1).abs() > cfg.clip).float(), m).item(),
                         "value_clipfrac": masked_mean(((v - v_old).abs() > cfg.value_clip).float(), m).item(),
                         "entropy": masked_mean(ent, m).item()}
                mstats.append(s)
                first = first or s
        policy.eval()
        value.eval()

        # adaptive KL (12), once per rollout batch, on the per-sequence KL summed over tokens (global batch)
        kl_seq = ((old_logp - ref_logp) * rmask).sum(-1)
        sums = all_sum([kl_seq.sum().item(), score.sum().item(), raw.sum().item(), non_score.sum().item(),
                        rmask.sum().item(), sum(ended)])
        kl, score_mean, raw_mean, non_score_mean, length, eos_rate = [x / cfg.batch_size for x in sums]
        beta_used = state["beta"]
        if cfg.adaptive_kl:
            state["beta"] = adaptive_kl(state["beta"], kl, cfg.kl_target, cfg.kl_horizon, cfg.batch_size)
        state["step"] = step + 1

        # metrics (13): means over the global batch; std, explained variance, minibatch statistics and speeds are
        # process 0's
        dt = time.time() - t0
        r_all, v_all = returns[rmask], old_values[rmask]
        ev = 1 - (r_all - v_all).var() / r_all.var() if r_all.numel() > 1 and r_all.var() > 0 else torch.tensor(0.0)
        rec = {"step": state["step"], "score_mean": score_mean, "score_std": score.std().item() if B > 1 else 0.0,
               "rm_score_mean": raw_mean, "kl": kl, "beta": beta_used, "non_score_reward": non_score_mean,
               "response_length": length, "eos_rate": eos_rate, "explained_variance": ev.item(),
               "tokens_per_s": rmask.sum().item() * world / dt, "gen_tokens_per_s": sum(map(len, toks)) / max(t_gen, 1e-9),
               "gen_time_share": t_gen / dt, "step_time": dt, "rollout_logprob_mismatch": mismatch,
               "first_minibatch": first}
        rec.update({k: sum(s[k] for s in mstats) / len(mstats) for k in mstats[0]})
        log(rec)
        bar.set_postfix(score=f"{rec['rm_score_mean']:.3f}", kl=f"{kl:.2f}", len=f"{rec['response_length']:.0f}")
        if state["step"] % cfg.log_every == 0 and main:
            for i in range(min(cfg.samples_per_log, len(texts))):
                tqdm.write(f"  [{score[i].item():+.2f}] {prompts_text[pick[i]][:60]!r} -> {texts[i][:100]!r}")
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            save_checkpoint(last, policy, tok, value, (opt_p, opt_v), (p_params, v_params), state)
    bar.close()
    return state


def main(argv):
    train(parse_args(Config, argv))
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
