"""
PPO with GAE, from scratch: ALMoST step 3, reinforcement learning from synthetic feedback. The policy starts from
the SFT policy of step 2 and learns to maximise the synthetic reward model's score minus beta * KL(policy || SFT).

    python ppo.py --policy=out/sft/best --rm=out/rm/last --prompts=out/queries.jsonl --out=out/ppo

A PPO step, as train() runs it:
  1. rollout      sample responses to a batch of prompts with THE sampler (temperature T, no top-k, no top-p)
  2. score        the logprobs of the policy and of the frozen reference (the SFT policy) and the values,
                  recomputed on one token layout; the reward model's score of each response
  3. advantages   per-token rewards -beta * (logp - logp_ref), the score added at the last real token (token_rewards);
                  GAE backwards over the response (gae); whitened advantages (masked_whiten): advantages
  4. PPO epochs   ppo_epochs passes of minibatches over fresh permutations, each a gradient step on ppo_loss
                  (less ent_coef x entropy_bonus)
  5. KL control   beta follows the measured KL towards --kl_target (adaptive_kl, Ziegler et al. 2019)
  6. log, save    one metrics.jsonl line; HF checkpoints of the policy (...ForCausalLM) and the value model
                  (...ForSequenceClassification) every --save_every steps; a rerun resumes
docs/ppo.md lists the implementation details that make this work and where each of them lives below.
"""
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from common import (UserError, commit_dir, derive_seed, model_folder, out_lock, parse_args, rank, run_cli,
                    world_size)
from lora import lora_disabled
from model import Llama, PAD_ID, last_token_index, load_config
from readers import read_prompts
from rm import RewardModel
from sample import generate
from tokenizer import Tokenizer, dialogue_ids, has_tokenizer, trim_to_sentence
from trainer import (ScaleConfig, all_sum, autocast, check_flags, compute_dtype, describe, end_distributed,
                     frozen_dtype, load_dtype, lora_key, make_optimizer, memory_dry_run, optimizer_step,
                     prepare_for_training, resume_from, save_training_checkpoint, setup_distributed, shard_bytes,
                     start_or_resume)


# -----------------------------------------------------------------------------
# the algorithms: masked statistics, the KL-shaped rewards, GAE, the PPO loss and the entropy bonus, the missing-EOS
# penalty, the KL controller

def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is True (all of them, or along dim)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the valid positions only; shift_mean=False keeps the mean (for rewards). With one valid
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


def token_rewards(score, logp, ref_logp, mask, beta):
    """Per-token rewards: -beta * (logp - logp_ref) on every response token (the KL penalty, estimated on the
    sampled token), plus the sequence's score at its last real response token (the EOS when there is one): not one
    past it, not at the first token. (B, R) tensors, score (B,). Returns (rewards, the non-score part)."""
    kl = (logp - ref_logp) * mask
    non_score = -beta * kl
    rewards = non_score.clone()
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last_token_index(mask)] += score
    return rewards, non_score


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) on (B, T) tensors whose mask marks each row's
    response tokens (a prefix of the row). Backwards: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, with V and A past the last token 0. Returns (advantages, returns = A + V),
    both 0 off the mask, detached; the returns are taken before the advantages are whitened."""
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


def advantages(score, logp, ref_logp, values, mask, beta, gamma=1.0, lam=0.95, whiten_rewards=False):
    """Step 3's advantage estimate on a rollout of B responses, (B, R) tensors, score (B,): the KL-shaped per-token
    rewards (token_rewards), GAE backwards over them (gae), the advantages whitened over the global batch
    (masked_whiten). whiten_rewards: the rewards whitened, without re-centring, before GAE.
    Returns (advantages, returns: the value model's targets, taken before the whitening, the KL part of the rewards)."""
    rewards, non_score = token_rewards(score, logp, ref_logp, mask, beta)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, values, mask, gamma, lam)
    return masked_whiten(adv, mask), returns, non_score


def ppo_loss(logp, old_logp, values, old_values, advantages, returns, mask, n_tokens, clip=0.2, value_clip=0.2):
    """PPO's clipped losses (Schulman et al. 2017) over the masked response tokens, each summed over the tokens and
    divided by n_tokens (the token count of the whole minibatch, over every process). (B, R) tensors.
    Policy: with ratio = exp(logp - logp_old), the larger of -A ratio and -A clip(ratio, 1 - clip, 1 + clip): a step
    gains nothing by pushing the ratio past the clip range in the direction the advantage favours.
    Value: half the larger of (V - R)^2 and (V_clipped - R)^2, V_clipped = V_old + clip(V - V_old, +-value_clip).
    Returns (policy_loss, value_loss, ratio)."""
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    policy_loss = (torch.max(pg_loss1, pg_loss2) * mask).sum() / n_tokens
    values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    value_loss = 0.5 * (torch.max(vf_loss1, vf_loss2) * mask).sum() / n_tokens
    return policy_loss, value_loss, ratio


def entropy_bonus(entropy, mask, n_tokens):
    """PPO's entropy bonus (Schulman et al. 2017, eq. 9): the policy's entropy at each masked response token (B, R),
    summed and divided by n_tokens as ppo_loss's terms are; the loss subtracts ent_coef times it, so a step also pays
    for narrowing the policy onto what the reward model likes."""
    return (entropy * mask).sum() / n_tokens


def missing_eos_scores(score, ended, penalty):
    """A response that never emitted EOS (cut at max_new_tokens) gets `penalty` as its score instead of the reward
    model's; one that ended keeps its score. score (B,), ended: B bools."""
    return torch.where(torch.tensor(ended, device=score.device), score, torch.full_like(score, penalty))


def adaptive_kl(beta, kl, target, horizon, n):
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n episodes."""
    err = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + err * n / horizon)


# -----------------------------------------------------------------------------
# config and prompts

@dataclass
class Config(ScaleConfig):   # device, dtype, LoRA, gradient checkpointing, FSDP: see trainer.py
    policy: str = ""               # the SFT policy (HF LLaMA folder); also the frozen reference
    rm: str = ""                   # the reward model; the value model starts from it (head re-used)
    prompts: str = ""              # .jsonl with "query" (or "prompt") fields, or .txt with one prompt a line
    out: str = "out/ppo"           # output folder: last/ (policy/ and value/), metrics.jsonl, config.json
    steps: int = 100               # rollout batches
    batch_size: int = 16           # episodes per rollout batch
    minibatch: int = 4             # episodes per gradient step
    ppo_epochs: int = 4            # passes over each rollout batch
    max_new_tokens: int = 128      # response length at most
    temperature: float = 1.0       # rollouts sample at T with top-k 0 and top-p 1; logprobs use the same T
    lr: float = 1e-5               # the policy's learning rate (AdamW)
    value_lr: float = 1e-5         # the value model's learning rate
    gamma: float = 1.0             # GAE discount
    lam: float = 0.95              # GAE lambda
    clip: float = 0.2              # policy ratio clip range
    value_clip: float = 0.2        # value clip range, around the rollout's values
    vf_coef: float = 0.5           # scales the value loss (separate optimizer, but reported together)
    ent_coef: float = 0.0          # entropy bonus: the loss less ent_coef x the policy's mean entropy per token
    beta: float = 0.05             # initial KL coefficient
    adaptive_kl: bool = True       # adapt beta towards kl_target
    kl_target: float = 6.0         # KL (nats per response) the controller aims at
    kl_horizon: int = 10000        # episodes over which the controller moves beta
    whiten_rewards: bool = False   # whiten the per-token rewards (without re-centring) before GAE
    missing_eos_penalty: float = -1.0   # the score of a response that never emits EOS
    penalize_missing_eos: bool = True   # False: a truncated response keeps its RM score (marked truncated in eos_rate)
    trim_cut: bool = False         # the reward model scores a truncated response back to its last full sentence
                                   # (tokenizer.trim_to_sentence), as its training answers were cut (the story profile)
    grad_clip: float = 1.0         # clip the gradients' global norm (policy and value alike)
    log_every: int = 1             # steps between printed sample responses
    save_every: int = 10           # steps between checkpoints (and the last step)
    samples_per_log: int = 2       # sample responses printed each log_every steps
    chat_template: bool = False    # prompts in the policy folder's chat template instead of the paper's Human/Assistant
    seed: int = 1337               # prompts, rollouts and minibatch order follow (seed, step)
    resume: bool = True            # go on from out/last if it is there


def encode_prompts(cfg, tok, ctx, master_process):
    """The prompts as token ids in the dialogue format; those that leave no room for a response are skipped."""
    texts = read_prompts(cfg.prompts)
    ids = [dialogue_ids(tok, p, chat=cfg.chat_template) for p in texts]
    fits = [len(p) + cfg.max_new_tokens <= ctx for p in ids]
    if not all(fits) and master_process:
        print(f"note: {fits.count(False)} prompt(s) of {cfg.prompts} leave no room for {cfg.max_new_tokens} new "
              f"tokens in the {ctx}-token context; they are skipped", file=sys.stderr)
    texts, ids = [t for t, f in zip(texts, fits) if f], [p for p, f in zip(ids, fits) if f]
    if not ids:
        raise UserError(f"{cfg.prompts}: no prompt fits the context window with --max_new_tokens={cfg.max_new_tokens}.")
    if len(ids) < cfg.batch_size and master_process:
        print(f"note: {len(ids)} prompts < --batch_size={cfg.batch_size}: each batch draws them with "
              f"replacement", file=sys.stderr)
    return texts, ids


# -----------------------------------------------------------------------------
# the four models and their forward on a rollout: one token layout for every pass, the same as the sampler's

@dataclass
class Models:
    """The four models of a PPO step, on one device, computing in one dtype: the policy and the value model are
    trained; the reference (the SFT policy) and the reward model are frozen. With LoRA (and no FSDP) there is one copy
    of each trunk: ref is None and the reference is the policy with its adapters off (reference_logprobs)."""
    policy: Llama
    ref: Optional[Llama]
    value: RewardModel
    reward_model: RewardModel
    value_bos: Optional[int]    # the BOS id the value model leaves out of a prompt, as the reward model reads it
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        return autocast(self.device, self.dtype)

    def reference_logprobs(self, idx, mask, P, temperature):
        """The reference's logprobs of the response tokens (B, R)."""
        if self.ref is not None:
            return logprobs_of(self.ref, idx, mask, P, temperature)[0]
        with lora_disabled(self.policy):
            return logprobs_of(self.policy, idx, mask, P, temperature)[0]


def load_models(cfg, tok, dev, dtype, last):
    """The policy and the value model (trained), the frozen reference and reward model. With LoRA (and no FSDP)
    there is one copy of each trunk: the reference is the policy with its adapters off, the reward model the value
    trunk with its adapters off and the RM's own head. Otherwise the frozen copies are stored as the trained models
    compute (frozen_dtype), so the reference gives the policy's logprobs exactly at step 0 in every precision.
    The value model predicts returns, which are sums of the *normalised* score (reward_scale_value_model).
    Returns (Models, resuming, policy params, value params)."""
    lora = cfg.lora_rank > 0
    policy_from, policy_adapters, resuming = resume_from(cfg, cfg.policy, os.path.join(last, "policy"))
    value_from, value_adapters, _ = resume_from(cfg, cfg.rm, os.path.join(last, "value"))
    policy = Llama.from_pretrained(policy_from, device=dev, dtype=load_dtype(cfg, dtype))
    value = RewardModel.from_pretrained(value_from, device=dev, dtype=load_dtype(cfg, dtype))
    if lora and not cfg.fsdp:
        ref = None
        reward_model = RewardModel(value.model, value.tok, value.max_length, value.chat)
        reward_model.head.weight = torch.nn.Parameter(value.head.weight.detach().clone().float(),
                                                      requires_grad=False)
        reward_model.normalizer = dict(value.normalizer)
    else:
        ref = Llama.from_pretrained(cfg.policy, device=dev, dtype=frozen_dtype(cfg, dtype)).requires_grad_(False)
        reward_model = RewardModel.from_pretrained(cfg.rm, device=dev, dtype=frozen_dtype(cfg, dtype))
        reward_model.requires_grad_(False)
    reward_scale_value_model(value, reward_model.normalizer, fold=not resuming)
    p_params = prepare_for_training(policy, cfg, dtype, seed=cfg.seed, trained_from=policy_adapters)
    v_params = prepare_for_training(value, cfg, dtype, heads=[value.head], seed=cfg.seed + 1,
                                    trained_from=value_adapters)
    for m in (policy, ref, reward_model, value):
        if m is not None:
            m.eval()   # no dropout anywhere: LLaMA has none, and eval() keeps it that way
    # the value model reads the rollout without the prompt's BOS when the reward model reads dialogues without one
    # (the paper's format; a chat template may write its own BOS)
    rm_reads_bos = dialogue_ids(tok, "x", "y", chat=reward_model.chat, bos=False)[:1] == [tok.bos_id]
    models = Models(policy, ref, value, reward_model, None if rm_reads_bos else tok.bos_id, dev, dtype)
    return models, resuming, p_params, v_params


@torch.no_grad()
def reward_scale_value_model(value, normalizer, fold=True):
    """Put the value model, which starts as the reward model (raw score w.h), on the scale of the rewards it predicts:
    the normalised score (w.h - mean) / std. GAE takes the value past the last token as 0, so a value model that is
    off by a constant c biases every advantage by -c lambda^(steps to the end): a bias that grows towards the EOS and
    whitening does not remove. The head is divided by std (fold, at a fresh start; a resumed head is folded already)
    and the value model's normaliser becomes (mean / std, 1), which values_of subtracts: at step 0 its value at the
    last token is exactly the normalised score. The saved value model keeps that normaliser in its config.json."""
    mean, std = normalizer["mean"], normalizer["std"]
    if fold:
        value.head.float()   # (a LoRA run's head loads in bf16; it is trained in fp32 anyway)
        value.head.weight.div_(std)
    value.normalizer = {"mean": mean / std, "std": 1.0}


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


def without_bos(idx, mask, P, bos_id):
    """The mask the value model reads the layout with: without a BOS that begins a prompt. The reward model scores
    a dialogue in the paper's format without BOS (rm.encode, as the authors' code), and the value model starts as the
    reward model, so it reads what the reward model read (positions follow the mask, so a row is then exactly the row
    without its BOS). bos_id None: keep every token (a reward model whose chat template writes a BOS)."""
    if bos_id is None:
        return mask
    rows = torch.arange(len(idx), device=idx.device)
    first = P - mask[:, :P].sum(-1)                                          # (B,) each prompt's first token
    drop = (idx[rows, first] == bos_id) & (first < P - 1)                   # never a prompt's only token
    vmask = mask.clone()
    vmask[rows[drop], first[drop]] = False
    return vmask


def logprobs_of(model, idx, mask, P, temperature):
    """Logprobs (B, R) of the response tokens under softmax(logits / T), and that whole distribution (B, R, V), from
    which entropy() reads. Only the response positions go through the head: the prompt's logits are never made."""
    logits = model(idx, mask=mask, logits=slice(P - 1, -1))                  # (B, R, V): position t predicts t+1
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    return logp_all.gather(-1, idx[:, P:, None]).squeeze(-1), logp_all


def entropy(logp_all):
    """The entropy (B, R) of each distribution (B, R, V) of logprobs: -sum p log p."""
    return -(logp_all.exp() * logp_all).sum(-1)


def values_of(value_model, idx, mask, P):
    """Per-token values (B, R) on the normalised score's scale: the value head on the state that emits each response
    token, less the value model's normaliser (reward_scale_value_model)."""
    n = value_model.normalizer
    return (value_model(idx, mask, per_token=True)[:, P - 1:-1] - n["mean"]) / n["std"]


# -----------------------------------------------------------------------------
# the phases of a PPO step

@dataclass
class Rollout:
    """One PPO step's episodes (this process's B rows): what the rollout sampled, its token layout, and what
    score_rollout computes on it."""
    prompt_texts: list          # B prompts, as text
    toks: list                  # B sampled responses, token ids without the EOS
    sampled_lp: list            # B lists: the sampler's logprobs of those tokens
    ended: list                 # B bools: the response emitted EOS before max_new_tokens
    texts: list                 # B decoded responses
    idx: torch.Tensor           # (B, P+R) left-padded prompts, then right-padded responses (with their EOS)
    mask: torch.Tensor          # (B, P+R) the real tokens
    vmask: torch.Tensor         # (B, P+R) the tokens the value model reads (without_bos)
    rmask: torch.Tensor         # (B, R) the response tokens
    P: int                      # the prompts' padded width
    # 2, 3. score_rollout
    old_logp: torch.Tensor = None    # (B, R) the policy's logprobs before this step's updates
    ref_logp: torch.Tensor = None    # (B, R) the reference's
    old_values: torch.Tensor = None  # (B, R) the value model's, on the normalised score's scale
    raw: torch.Tensor = None         # (B,) the reward model's normalised score
    score: torch.Tensor = None       # (B,) the score rewarded (raw, or the missing-EOS penalty)
    non_score: torch.Tensor = None   # (B, R) the KL part of the per-token rewards
    adv: torch.Tensor = None         # (B, R) GAE advantages, whitened over the global batch
    returns: torch.Tensor = None     # (B, R) GAE returns, the value model's targets
    gen_time: float = 0.0            # seconds the sampler took
    mismatch: float = 0.0            # the largest gap between the sampler's and the recomputed logprobs
    trimmed: float = 0.0             # the share of each cut response's text the reward model did not read, summed


def rollout(models, prompts, prompt_texts, seeds, tok, cfg):
    """1. Sample one response per prompt with THE sampler, stopping at EOS, at temperature T with top-k 0 and top-p 1
    (the distribution the logprobs are recomputed under). The EOS is part of the response; a response that never
    emits it ends at max_new_tokens."""
    eos = tok.eos_id
    models.policy.eval()
    t0 = time.time()
    with models.autocast():
        toks, sampled_lp = generate(models.policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=0,
                                    top_p=1.0, stop_ids=[eos], seed=seeds)
    ended = [len(t) < cfg.max_new_tokens for t in toks]
    responses = [t + [eos] if e else t for t, e in zip(toks, ended)]
    idx, mask, rmask, P = layout(prompts, [r if r else [eos] for r in responses])
    dev = models.device
    gen_time = time.time() - t0
    return Rollout(prompt_texts, toks, sampled_lp, ended, [tok.decode(t) for t in toks], idx.to(dev), mask.to(dev),
                   without_bos(idx, mask, P, models.value_bos).to(dev), rmask.to(dev), P, gen_time=gen_time)


@torch.no_grad()
def score_rollout(models, r, cfg, beta):
    """2 and 3. Recompute the logprobs of the policy and the reference (at the same T) and the values on the rollout's
    layout, in minibatch-sized chunks so the (rows, T, vocab) logits never exceed a training step's; the reward
    model's normalised score (or the missing-EOS penalty); the KL-shaped per-token rewards; GAE; whitening."""
    chunk = cfg.minibatch // world_size()
    chunks = [slice(i, i + chunk) for i in range(0, len(r.idx), chunk)]
    T = cfg.temperature
    with models.autocast():
        r.old_logp = torch.cat([logprobs_of(models.policy, r.idx[c], r.mask[c], r.P, T)[0] for c in chunks])
        r.ref_logp = torch.cat([models.reference_logprobs(r.idx[c], r.mask[c], r.P, T) for c in chunks])
        r.old_values = torch.cat([values_of(models.value, r.idx[c], r.vmask[c], r.P) for c in chunks])
        texts = [trim_to_sentence(t) if cfg.trim_cut and not e else t for t, e in zip(r.texts, r.ended)]
        r.trimmed = sum(1 - len(s) / len(t) for s, t in zip(texts, r.texts) if t)   # characters left unscored
        with lora_disabled(models.reward_model):
            r.raw = models.reward_model.score(r.prompt_texts, texts, normalize=True).to(models.device)
        r.score = missing_eos_scores(r.raw, r.ended, cfg.missing_eos_penalty) if cfg.penalize_missing_eos else r.raw
        # the sampler's logprobs against the recomputed ones: any gap means rollout and training disagree
        r.mismatch = max((abs(a - b) for t, s, row in zip(r.toks, r.sampled_lp, r.old_logp.tolist())
                          for a, b in zip(s, row[:len(t)])), default=0.0)
        r.adv, r.returns, r.non_score = advantages(r.score, r.old_logp, r.ref_logp, r.old_values, r.rmask, beta,
                                                   cfg.gamma, cfg.lam, cfg.whiten_rewards)
    return r


def ppo_epochs(models, r, opts, params, cfg, g, state):
    """4. ppo_epochs passes over the rollout batch, each in minibatches of a fresh permutation, one gradient step on
    ppo_loss per minibatch. A global minibatch is minibatch / world rows of every process; each process's loss is its
    tokens' sum over the global minibatch's token count, and the gradients are summed over the processes. Returns the
    statistics of every minibatch."""
    policy, value = models.policy, models.value
    policy.train()
    value.train()
    B, world, stats = len(r.idx), world_size(), []
    for epoch in range(cfg.ppo_epochs):
        for mb in torch.randperm(B, generator=g).split(cfg.minibatch // world):
            mb = mb.to(models.device)
            m = r.rmask[mb]
            n_tok, = all_sum([m.sum().item()])
            with models.autocast():
                logp, logp_all = logprobs_of(policy, r.idx[mb], r.mask[mb], r.P, cfg.temperature)
                with torch.set_grad_enabled(cfg.ent_coef != 0):   # a graph only when the loss has the bonus
                    ent = entropy(logp_all)
                del logp_all
                v = values_of(value, r.idx[mb], r.vmask[mb], r.P)
            policy_loss, value_loss, ratio = ppo_loss(logp, r.old_logp[mb], v, r.old_values[mb], r.adv[mb],
                                                      r.returns[mb], m, n_tok, cfg.clip, cfg.value_clip)
            loss = policy_loss + cfg.vf_coef * value_loss
            if cfg.ent_coef:
                loss = loss - cfg.ent_coef * entropy_bonus(ent, m, n_tok)
            loss.backward()
            optimizer_step(params[0], opts[0], cfg, cfg.grad_clip, state)
            optimizer_step(params[1], opts[1], cfg, cfg.grad_clip, state)
            with torch.no_grad():   # this process's share of the minibatch
                share = n_tok / max(m.sum().item(), 1)
                old_logp, old_v = r.old_logp[mb], r.old_values[mb]
                stats.append({"policy_loss": policy_loss.item() * share, "value_loss": value_loss.item() * share,
                              "ratio": masked_mean(ratio, m).item(),
                              "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, m).item(),
                              "clipfrac": masked_mean(((ratio - 1).abs() > cfg.clip).float(), m).item(),
                              "value_clipfrac": masked_mean(((v - old_v).abs() > cfg.value_clip).float(), m).item(),
                              "entropy": masked_mean(ent, m).item()})
    policy.eval()
    value.eval()
    return stats


def step_metrics(r, stats, cfg, state, t0):
    """5. The step's metrics: means over the global batch; the std, explained variance, minibatch statistics and
    speeds are this process's. The first minibatch's statistics are kept apart: on it the ratio must be 1, the
    approximate KL and the clip fraction 0 (the rollout and training forwards agree)."""
    rmask, world = r.rmask, world_size()
    kl_seq = ((r.old_logp - r.ref_logp) * rmask).sum(-1)                       # per-sequence KL, summed over tokens
    sums = all_sum([kl_seq.sum().item(), r.score.sum().item(), r.raw.sum().item(), r.non_score.sum().item(),
                    rmask.sum().item(), sum(r.ended), r.trimmed])
    kl, score_mean, raw_mean, non_score_mean, length, eos_rate, trimmed = [x / cfg.batch_size for x in sums]
    dt = time.time() - t0
    r_all, v_all = r.returns[rmask], r.old_values[rmask]
    ev = 1 - (r_all - v_all).var() / r_all.var() if r_all.numel() > 1 and r_all.var() > 0 else torch.tensor(0.0)
    rec = {"step": state["step"] + 1, "score_mean": score_mean,
           "score_std": r.score.std().item() if len(rmask) > 1 else 0.0, "rm_score_mean": raw_mean, "kl": kl,
           "beta": state["beta"], "non_score_reward": non_score_mean, "response_length": length, "eos_rate": eos_rate,
           "explained_variance": ev.item(), "tokens_per_s": rmask.sum().item() * world / dt,
           "gen_tokens_per_s": sum(map(len, r.toks)) / max(r.gen_time, 1e-9), "gen_time_share": r.gen_time / dt,
           "step_time": dt, "rollout_logprob_mismatch": r.mismatch, "skipped_steps": state.get("skipped_steps", 0),
           "first_minibatch": stats[0]}
    if cfg.trim_cut:   # the share of the responses' text after the cut that the reward model did not read
        rec["trimmed_share"] = trimmed
    rec.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})
    return rec


# -----------------------------------------------------------------------------
# checkpoints and the memory plan

def save_checkpoint(path, policy, tok, value, opts, params, state, final, max_shard_bytes):
    """policy/, value/ and state in one folder, swapped in atomically (a crash never leaves a mixed checkpoint).
    Every process calls this (FSDP gathers its shards); process 0 writes. The final one holds no optimizer moments
    (a later run with more --steps goes on with fresh ones)."""
    tmp = path + ".new"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    save_policy = lambda p, files: policy.save_pretrained(p, max_shard_bytes, files={**tok.files(), **files})  # noqa
    save_training_checkpoint(save_policy, params[0], opts[0], os.path.join(tmp, "policy"), state, policy, final)
    save_training_checkpoint(lambda p, files: value.save_pretrained(p, files, max_shard_bytes), params[1], opts[1],
                             os.path.join(tmp, "value"), state, value, final)
    if rank() == 0:
        commit_dir(tmp, path)


def dry_run(cfg):
    """The memory plan of this run: rollout rows batch_size / world, minibatch / world rows per training forward of
    prompt + max_new_tokens tokens (the longest prompt, when the prompts and the policy's tokenizer are at hand)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prompt = 256
    if os.path.isfile(cfg.prompts) and has_tokenizer(cfg.policy):
        tok = Tokenizer(cfg.policy)
        prompt = max(len(dialogue_ids(tok, p, chat=cfg.chat_template)) for p in read_prompts(cfg.prompts))
    elif rank() == 0:
        print(f"(prompt length taken as {prompt} tokens: --prompts or the policy's tokenizer is not at hand)")
    return memory_dry_run(cfg, cfg.policy, "ppo", max(1, cfg.minibatch // world), prompt + cfg.max_new_tokens,
                          rollout_rows=max(1, cfg.batch_size // world), response=cfg.max_new_tokens)


# -----------------------------------------------------------------------------
# training

def check_config(cfg):
    for k in ("policy",) if cfg.dry_run else ("policy", "rm", "prompts"):
        if not getattr(cfg, k):
            raise UserError(f"--{k} is required (python ppo.py --policy=SFT_FOLDER --rm=RM_FOLDER --prompts=FILE).")
    cfg.policy, cfg.rm = model_folder(cfg.policy, "--policy", not cfg.dry_run), model_folder(cfg.rm, "--rm")
    check_flags(cfg)
    if cfg.batch_size % cfg.minibatch:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of --minibatch={cfg.minibatch}.")
    if cfg.temperature <= 0:
        raise UserError("--temperature must be > 0: PPO needs a sampling distribution.")
    if cfg.trim_cut and cfg.penalize_missing_eos:
        raise UserError("--trim_cut=true changes the score of a response cut by the budget, which "
                        "--penalize_missing_eos=true replaces with the penalty: turn one of them off.")
    if not cfg.dry_run:
        RewardModel.check(cfg.rm, "--rm")      # the reward, and the value model's start


def train(cfg):
    check_config(cfg)
    if cfg.dry_run:
        return dry_run(cfg)
    master_process, world, dev = setup_distributed(cfg.device)
    if cfg.minibatch % world:
        raise UserError(f"--minibatch={cfg.minibatch} (and --batch_size) must be a multiple of the {world} processes.")
    dtype = compute_dtype(cfg, dev)
    tok = Tokenizer(cfg.policy)
    if not tok.same_as(Tokenizer(cfg.rm)):
        raise UserError(f"{cfg.rm}: its tokenizer differs from the policy's ({cfg.policy}). The value model starts "
                        f"from the reward model and reads the policy's token ids, so the two must share one "
                        f"tokenizer: train the reward model from the policy's base model.")
    prompt_texts, prompt_ids = encode_prompts(cfg, tok, load_config(cfg.policy).context,
                                              master_process)
    last = os.path.join(cfg.out, "last")
    models, resuming, p_params, v_params = load_models(cfg, tok, dev, dtype, last)
    policy, value = models.policy, models.value
    opts = make_optimizer(policy, cfg.lr, 0.0), make_optimizer(value, cfg.value_lr, 0.0)
    run = {"policy": os.path.abspath(cfg.policy), "rm": os.path.abspath(cfg.rm), "lora": lora_key(cfg)}
    loads = [(p_params, opts[0], os.path.join(last, "policy")), (v_params, opts[1], os.path.join(last, "value"))]
    state, log = start_or_resume(cfg, cfg.out, os.path.join(last, "policy"), {"step": 0, "beta": cfg.beta}, run,
                                 loads if resuming else [])
    if master_process:
        print(f"ppo: {cfg.batch_size} episodes a step over {world} process(es); {dev} "
              f"{str(dtype).removeprefix('torch.')}; policy: {describe(p_params, policy, cfg)}; value: "
              f"{describe(v_params, value, cfg)}")

    B = cfg.batch_size // world                  # this process's rollout rows; it owns rows [rank * B, (rank + 1) * B)
    rows = range(rank() * B, (rank() + 1) * B)
    bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc="ppo", dynamic_ncols=True,
               disable=not master_process)
    for step in bar:
        t0 = time.time()
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "ppo_step", step))   # all randomness follows the step
        if len(prompt_ids) >= cfg.batch_size:
            pick = torch.randperm(len(prompt_ids), generator=g)[:cfg.batch_size].tolist()
        else:
            pick = torch.randint(len(prompt_ids), (cfg.batch_size,), generator=g).tolist()
        pick = [pick[j] for j in rows]

        # 1. rollout
        batch = rollout(models, [prompt_ids[i] for i in pick], [prompt_texts[i] for i in pick],
                        [derive_seed(cfg.seed, "sampling", step, j) for j in rows], tok, cfg)
        # 2, 3. score, rewards, advantages (filled into the record)
        batch = score_rollout(models, batch, cfg, state["beta"])
        # 4. PPO epochs
        stats = ppo_epochs(models, batch, opts, (p_params, v_params), cfg, g, state)
        # 5. the step's metrics; KL control, once per rollout batch, on the per-sequence KL of the global batch
        rec = step_metrics(batch, stats, cfg, state, t0)
        if cfg.adaptive_kl:
            state["beta"] = adaptive_kl(state["beta"], rec["kl"], cfg.kl_target, cfg.kl_horizon, cfg.batch_size)
        state["step"] = step + 1
        # 6. log and save
        log(rec)
        bar.set_postfix(score=f"{rec['rm_score_mean']:.3f}", kl=f"{rec['kl']:.2f}", len=f"{rec['response_length']:.0f}")
        if state["step"] % cfg.log_every == 0 and master_process:
            for i in range(min(cfg.samples_per_log, len(batch.toks))):
                tqdm.write(f"  [{batch.score[i].item():+.2f}] {batch.prompt_texts[i][:60]!r} -> "
                           f"{batch.texts[i][:100]!r}")
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            save_checkpoint(last, policy, tok, value, opts, (p_params, v_params), state, state["step"] == cfg.steps,
                            shard_bytes(cfg))
    bar.close()
    return state


def main(argv):
    cfg = parse_args(Config, argv)
    if cfg.dry_run:
        return train(cfg)
    with out_lock(cfg.out):        # one run per output folder; --out checked before any model loads
        train(cfg)
    end_distributed()


if __name__ == "__main__":
    run_cli(main)
