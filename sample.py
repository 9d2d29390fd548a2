"""
THE sampler: batched, left-padded, KV-cached generation with temperature / top-k / top-p, per-row stop ids and
the logprob of every sampled token. The CLI, data generation, self-play and PPO rollouts all call `generate`.

    python sample.py                                   # a few stories from the bundled model, streamed
    python sample.py --prompt="Once upon a time" --temperature=0
    python sample.py --model=path/to/llama --prompt_file=prompts.txt --num_samples=4 --max_new_tokens=256
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch

from common import UserError, model_folder, parse_args, read_text, run_cli, world_size
from lora import merged
from model import DTYPES, load, pad_batch


# -----------------------------------------------------------------------------
# choosing the next token

TOP_P_CANDIDATES = 256   # filter_logits ranks this many tokens first when a full sort costs more than a host sync


def filter_logits(logits, top_k=0, top_p=1.0, full_sort=None):
    """Set to -inf every logit outside the top-k, then outside the smallest set whose probability reaches
    top_p (the most likely token always stays). logits: (B, V) fp32, already divided by the temperature.
    full_sort: rank the whole vocabulary for top-p (None: on a GPU, where sorting is cheap and the shortcut below
    would cost a host sync). Otherwise the TOP_P_CANDIDATES most likely tokens are ranked first: in a row where they
    reach top_p every token below them is dropped anyway (the set a full sort gives); only the other rows (flat
    distributions) are sorted in full, which takes a look at the data (a sync), free on a CPU."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p >= 1.0:
        return logits
    probs_all = logits.softmax(-1)

    def nucleus(probs, order):   # probs (b, k) descending, their token ids -> (b, V) kept: those whose betters < top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        keep = torch.zeros(probs.shape[0], probs_all.shape[-1], dtype=torch.bool, device=probs.device)
        return keep.scatter_(-1, order, ~drop)

    if full_sort is None:
        full_sort = logits.device.type != "cpu"
    if full_sort or logits.size(-1) <= TOP_P_CANDIDATES:
        keep = nucleus(*torch.sort(probs_all, dim=-1, descending=True))
    else:
        probs, order = torch.topk(probs_all, TOP_P_CANDIDATES, dim=-1)       # (B, k), descending
        keep = nucleus(probs, order)
        short = probs.sum(-1) < top_p                                         # (B,) rows the candidates do not cover
        if bool(short.any()):
            keep[short] = nucleus(*torch.sort(probs_all[short], dim=-1, descending=True))
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(logits, temperature, top_k, top_p, generator, rows=None, index=None, batch=None):
    """logits (b, V) fp32 -> (next ids (b,), their logprobs (b,) under the distribution sampled from).
    Greedy (temperature 0) reports logprobs under the model's untempered distribution. Once finished rows have left
    the batch, rows (a list) and index (a (b,) tensor) give each row's place in the original batch of `batch` rows:
    the noise is still drawn for the whole original batch (or by each row's own generator), so a row samples the same
    whether or not others have finished."""
    if temperature == 0:
        logp = logits.log_softmax(-1)
        nxt = logits.argmax(-1)
    else:
        logp = filter_logits(logits / temperature, top_k, top_p).log_softmax(-1)
        # argmax of p / Exp(1) noise is an exact draw from p (the exponential race), and needs no sync. The noise
        # is -log(U), U uniform in [0, 1) (a quarter of the cost of exponential_ on a CPU), clamped: a draw of
        # exactly 0 would turn p / 0 into inf, or nan for a filtered token, and win
        V, kw = logp.shape[-1], dict(device=logp.device, dtype=logp.dtype)
        if isinstance(generator, list):   # one generator per row: a row's draw does not depend on the batch
            gens = generator if rows is None else [generator[r] for r in rows]
            u = torch.stack([torch.rand(V, generator=g, **kw) for g in gens])
        elif rows is None:
            u = torch.rand(logp.shape, generator=generator, **kw)
        else:
            u = torch.rand(batch, V, generator=generator, **kw)[index]
        noise = u.log_().neg_().clamp_(min=torch.finfo(logp.dtype).tiny)
        nxt = (logp.exp() / noise).argmax(-1)
    return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)


# -----------------------------------------------------------------------------
# batched generation

def check_lengths(model, prompts, max_new_tokens):
    ctx = model.config.context
    if not prompts:
        raise UserError("no prompts to sample from: pass at least one prompt.")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty: a prompt needs at least one token (BOS counts).")
        if len(p) >= ctx:
            raise UserError(f"prompt {i} has {len(p)} tokens, but the model holds {model.config.context_note()}: "
                            f"shorten the prompt (it must leave room for at least one new token).")
        if len(p) + max_new_tokens > ctx:
            raise UserError(f"prompt {i} ({len(p)} tokens) + max_new_tokens={max_new_tokens} is past "
                            f"{model.config.context_note()}: lower --max_new_tokens to {ctx - len(p)} or less.")


def shared_prefix_length(prompts):
    """The number of leading tokens every prompt has in common, leaving each prompt at least one token of its own
    (the first new token is predicted from a row's last prompt token)."""
    first, n = prompts[0], min(map(len, prompts)) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


SHARE_PREFIX = 32   # generate() computes a prompt prefix once when at least 2 rows share this many tokens


def is_sharded(model):
    """True when the model's weights are sharded over torchrun processes (FSDP): each of its forwards then gathers
    the weights from every process, so every process must run the same forwards, or all of them wait for ever."""
    if world_size() == 1:
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """FSDP: every sharded module's weights all-gathered once and kept for the forwards inside (a rollout: one
    forward a token), then resharded; by default each forward would gather them again. Every process enters it."""
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        for m in modules:
            m.reshard()


def all_values(x, device):
    """The integer x of every process, as a list."""
    out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    torch.distributed.all_gather(out, torch.tensor([x], device=device))
    return [int(t) for t in out]


def all_ranks(flag, device):
    """True when `flag` is true in every process (a logical AND over the process group)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def seeded(seed, rows, device):
    """The sampler's random generator: None (torch's global one), one for the batch (an int), or one per row (a
    list of rows ints: a row then samples the same whatever batch it is in)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != rows:
            raise ValueError(f"{len(seed)} seeds for {rows} prompts")
        return [torch.Generator(device=device).manual_seed(s) for s in seed]
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def prefill(model, prompts, max_new_tokens, share_prefix, sync, device):
    """1) The prompts into a new KV cache with room for max_new_tokens more: the prefix every row shares, when it is
    share_prefix tokens or longer, once (a batch of one; under sync every process prefills one, or none does), then
    every row's own tokens at once, left-padded. Returns (cache, the logits after each row's last token (B, V))."""
    P = shared_prefix_length(prompts) if share_prefix and len(prompts) > 1 else 0
    use_prefix = P >= share_prefix > 0
    if sync:   # the prefix's prefill is one forward more: every process runs it, or none does
        use_prefix = all_ranks(use_prefix, device)
    prefix = None
    if use_prefix:
        prefix = model.new_cache(1, P)
        model(torch.tensor([prompts[0][:P]], device=device), cache=prefix, logits="none")
    else:
        P = 0
    idx, mask = pad_batch([p[P:] for p in prompts], left=True, device=device)  # (B, T0), left padding
    B, T0 = idx.shape
    cache = model.new_cache(B, T0 + max_new_tokens, prefix=prefix)
    return cache, model(idx, mask=mask, cache=cache, logits="last")[:, -1]


def decode(model, cache, logits, pick, rows, on_token=None):
    """2) The decode loop. From the logits after each prompt (B, V): pick a token for every row still in the batch
    (sample_next, through pick), record it, let the rows' ending rule see it (Rows.update, which drops the rows that
    have ended from the batch and the cache), and feed the rest through the cached forward, until no row is left or
    the budget is spent. -> tokens and logprobs (B, budget), and the number kept per row (a list of B ints)."""
    B, device = logits.shape[0], logits.device
    toks = torch.zeros(B, rows.budget, dtype=torch.long, device=device)
    lps = torch.zeros(B, rows.budget, dtype=torch.float32, device=device)
    for step in range(rows.budget):
        nxt, lp = pick(logits, rows)                                                  # (b,), (b,)
        toks[rows.index, step], lps[rows.index, step] = nxt, lp.float()
        if on_token is not None:
            on_token(step, nxt)
        nxt = rows.update(step, nxt, cache)                                           # the rows still running
        if rows.done:
            break
        logits = model(nxt[:, None], cache=cache, logits="last")[:, -1]             # (b, V)
    return toks, lps, rows.n_new


class Rows:
    """The rows of a decode and the rule that ends them: a row ends at a stop id (not kept), when its text holds a
    stop string (kept: StopStrings), or at the budget. Every check_every steps (every step with stop strings) the rule
    looks at which rows have ended: one transfer of the step's tokens, ended flags and kept counts, the host sync of
    that step. Then the decode is done when every row has ended (in every process, under sync), and with compact the
    ended rows leave the batch and the KV cache, so they cost no more forwards. Between looks an ended row runs on;
    its tokens are dropped. rows (host) and index (device): the original index of each row still in the batch."""

    def __init__(self, B, budget, stop, device, stops=None, check_every=1, sync=False, compact=True):
        self.budget, self.stop, self.stops, self.every, self.sync, self.compact = budget, stop, stops, check_every, \
            sync, compact
        self.rows, self.index = list(range(B)), torch.arange(B, device=device)
        self.ended = torch.zeros(B, dtype=torch.bool, device=device)            # (b,) the row has ended
        self.kept = torch.full((B,), budget, device=device)                     # (b,) the tokens it keeps
        self.n_new, self.done = [budget] * B, False                             # tokens kept per row, at the looks

    def update(self, step, nxt, cache):
        """Step `step`'s tokens nxt (b,) -> those of the rows still in the batch (the cache keeps only their slots)."""
        new = torch.isin(nxt, self.stop) & ~self.ended                          # a stop id is not kept
        self.ended, self.kept = self.ended | new, torch.where(new, step, self.kept)
        last = step == self.budget - 1
        if not (last or self.stops is not None or (step + 1) % self.every == 0):
            return nxt
        tokens, ended, kept = torch.stack([nxt, self.ended.long(), self.kept]).tolist()   # the host sync of this step
        if self.stops is not None:   # a stop string, found in the rows' text: the row keeps this token
            hit = self.stops.hits(self.rows, tokens, ended)
            if hit:
                for j in hit:
                    ended[j], kept[j] = 1, step + 1
                hit = torch.tensor([j in hit for j in range(len(self.rows))], device=nxt.device)
                self.ended, self.kept = self.ended | hit, torch.where(hit, step + 1, self.kept)
        for r, e, k in zip(self.rows, ended, kept):
            if e:
                self.n_new[r] = k
        self.done = last or (all_ranks(all(ended), nxt.device) if self.sync else all(ended))
        n = max(1, len(self.rows) - sum(ended))   # (under sync a process keeps a finished row as a placeholder)
        if self.done or not self.compact or n == len(self.rows):
            return nxt
        keep = torch.argsort(self.ended.to(torch.uint8), stable=True)[:n]       # the running rows, first, in order
        cache.keep(keep)
        self.rows = [r for r, e in zip(self.rows, ended) if not e] or self.rows[:1]
        self.index, self.ended, self.kept = self.index[keep], self.ended[keep], self.kept[keep]
        return nxt[keep]


class StopStrings:
    """The stopping rule on text: a row ends as soon as the decoded text of its new tokens contains one of the plain
    strings, or a compiled pattern matches it. Each new token decodes the row's text again (a string may span tokens
    or start inside one) and searches only where a plain string could end in the newest token's text."""

    def __init__(self, stop_strings, tokenizer, rows):
        self.plain = [s for s in stop_strings if isinstance(s, str)]
        self.patterns = [s for s in stop_strings if not isinstance(s, str)]
        self.longest = max(map(len, self.plain or [""]))
        self.tokenizer, self.ids, self.seen = tokenizer, [[] for _ in range(rows)], [0] * rows

    def complete(self, row, token):
        """Add token to the row's text; True when a stop string is now in it."""
        self.ids[row].append(token)
        text = self.tokenizer.decode(self.ids[row])
        tail = text[max(0, self.seen[row] - self.longest):]
        self.seen[row] = len(text)
        return any(s in tail for s in self.plain) or any(p.search(text) for p in self.patterns)

    def hits(self, rows, tokens, ended):
        """The batch positions of the rows (original indices `rows`, new `tokens`, host lists) that have not ended and
        whose text now holds a stop string."""
        return [j for j, (r, t, e) in enumerate(zip(rows, tokens, ended)) if not e and self.complete(r, t)]


CHECK_EVERY = 8   # decode's checks on a GPU: one host sync every 8 tokens (on a CPU a sync is free: every token)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_ids=None, seed=None,
             on_token=None, stop_strings=None, tokenizer=None, compact=True, share_prefix=SHARE_PREFIX, sync=None,
             check_every=None):
    """
    prompts: list of B token-id lists (any lengths). They are left-padded into one batch that shares one
    KV cache; per-row positions keep each row exactly as it would be alone.
    share_prefix: when the rows' prompts begin with the same P >= share_prefix tokens (a few-shot prompt, say), that
    prefix is prefilled once, its keys and values are kept once for the whole batch, and attention reads them with
    cascade_attention (model.py); the output is that of computing every row in full, up to float rounding
    (tests/test_sample.py checks tokens and logprobs). 0 turns it off.
    stop_ids: a row ends at its first one (excluded from the output). None: the model's EOS ids
    (generation_config.json, else config.json); [] never stops early.
    stop_strings: a row also ends as soon as the decoded text of its new tokens (tokenizer.decode) contains one of
    these strings, which may span several tokens or start inside one. Its tokens and logprobs then end with the
    token that completed the string; the caller cuts the text at the string (text[:text.find(s)]). An item may
    also be a compiled regular expression, searched in the whole text (comparisons.QUERY_STOPS: "a line that starts with
    Query: is complete").
    A row that has ended leaves the batch: its slots of the KV cache are dropped and no forward pass is spent on it
    (compact=False keeps it in the batch to the end: the baseline bench.py measures against).
    check_every: decoded tokens between the loop's looks at which rows have ended (a host sync each; Rows). None:
    CHECK_EVERY on a GPU, 1 on a CPU; stop strings and on_token look at every token. The tokens do not depend on it.
    sync: every torchrun process runs the same number of forwards (the model is sharded, so each forward is a
    collective): the batch decodes until the rows of every process have ended, a process whose rows have all ended
    keeps one finished row as a placeholder (its tokens are dropped), and the shared prefix is prefilled in every
    process or in none. The weights are gathered once for the whole call (gathered). None: when the model is sharded
    by FSDP (is_sharded); one process never synchronises.
    LoRA adapters are prepared once for the call (lora.merged): folded into copies of fp32 layers, so that a sampled
    token costs what it costs the plain model; cast once beside bf16 layers, which cannot hold a small adapter.
    seed: the same seed gives the same samples; a list of B seeds seeds each row alone, so a row samples the same
    whatever batch it is in (PPO's rollouts split over processes use this). on_token(step, ids) is called after every
    step with the new ids of the rows in the batch (streaming).
    returns (tokens, logprobs): per row, the list of new ids and the list of their fp32 logprobs.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to decode with")
    check_lengths(model, prompts, max_new_tokens)
    device = model.embed_tokens.weight.device
    stop = torch.tensor(model.eos_ids if stop_ids is None else list(stop_ids), dtype=torch.long, device=device)
    generator = seeded(seed, len(prompts), device)
    sync = is_sharded(model) if sync is None else sync and world_size() > 1
    if sync and len(set(all_values(max_new_tokens, device))) > 1:   # the processes leave the loop together
        raise ValueError("under FSDP every process must sample with the same max_new_tokens")
    if check_every is None:
        check_every = 1 if device.type == "cpu" else CHECK_EVERY
    was_training = model.training
    model.eval()
    with gathered(model) if is_sharded(model) else contextlib.nullcontext(), merged(model):
        # 1) prefill the prompts; 2) decode one token a step
        B = len(prompts)
        cache, logits = prefill(model, prompts, max_new_tokens, share_prefix, sync, device)   # (B, V)
        stops = StopStrings(stop_strings, tokenizer, B) if stop_strings else None
        rows = Rows(B, max_new_tokens, stop, device, stops, 1 if on_token else check_every, sync, compact)
        pick = lambda logits, r: sample_next(logits, temperature, top_k, top_p, generator,  # noqa: E731
                                             r.rows if len(r.rows) < B else None, r.index, B)
        toks, lps, n_new = decode(model, cache, logits, pick, rows, on_token)
        del cache
    model.train(was_training)
    toks, lps = toks.tolist(), lps.tolist()
    return [t[:n] for t, n in zip(toks, n_new)], [lp[:n] for lp, n in zip(lps, n_new)]


# -----------------------------------------------------------------------------
# CLI

@dataclass
class Config:
    model: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stories260K")  # model folder
    prompt: str = ""             # the prompt text; "" samples from BOS alone
    prompt_file: str = ""        # a text file, one prompt a line; overrides --prompt
    num_samples: int = 3         # samples per prompt
    max_new_tokens: int = 200    # new tokens per sample at most
    temperature: float = 0.8     # 0 is greedy
    top_k: int = 0               # keep the k most likely tokens (0: all)
    top_p: float = 0.9           # keep the smallest set of tokens whose probability reaches p (1: all)
    seed: int = 1337             # the same seed gives the same samples
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda or cuda:N
    dtype: str = ""              # "" = fp32 on CPU, bf16 on CUDA; or float32 / bfloat16 / float16
    stream: bool = True          # print each sample as it is generated; False: one batch, printed at the end


def main(argv):
    cfg = parse_args(Config, argv)
    if cfg.dtype and cfg.dtype not in DTYPES:
        raise UserError(f"--dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}.")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={cfg.device}: no CUDA GPU is visible here. Use --device=cpu.")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise UserError("--num_samples and --max_new_tokens must be at least 1.")
    for bad, message in ((cfg.temperature < 0, f"--temperature={cfg.temperature}: use 0 (greedy) or more."),
                         (not 0 < cfg.top_p <= 1, f"--top_p={cfg.top_p}: use a number in (0, 1]; 1 keeps every token."),
                         (cfg.top_k < 0, f"--top_k={cfg.top_k}: use 0 (no cut) or more.")):
        if bad:
            raise UserError(message)
    model, tok = load(model_folder(cfg.model), device=cfg.device, dtype=DTYPES.get(cfg.dtype))
    if cfg.prompt_file:
        texts = [line for line in read_text(cfg.prompt_file, "prompt file").splitlines() if line.strip()]
        if not texts:
            raise UserError(f"{cfg.prompt_file}: has no non-empty line. Put one prompt per line.")
    else:
        texts = [cfg.prompt]
    prompts = [tok.encode(t, bos=True) for t in texts]
    check_lengths(model, prompts, cfg.max_new_tokens)
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    t0, n = time.time(), 0
    if cfg.stream:
        # one sample at a time (seed, seed+1, ...), its text printed as the tokens arrive
        for j, (text, ids) in enumerate((t, p) for t, p in zip(texts, prompts) for _ in range(cfg.num_samples)):
            seen, shown = list(ids), tok.decode(ids)
            print(text, end="", flush=True)

            def on_token(step, nxt):
                nonlocal shown
                seen.append(int(nxt[0]))
                full = tok.decode(seen)
                if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(full[len(shown):])
                    sys.stdout.flush()
                    shown = full

            out, _ = generate(model, [ids], cfg.max_new_tokens, **kw, seed=cfg.seed + j, on_token=on_token)
            n += len(out[0])
            print("\n" + "-" * 40, flush=True)
    else:
        # every sample of every prompt in one left-padded batch
        batch = [p for p in prompts for _ in range(cfg.num_samples)]
        out, _ = generate(model, batch, cfg.max_new_tokens, **kw, seed=cfg.seed)
        for ids, new in zip(batch, out):
            print(tok.decode(ids + new))
            print("-" * 40)
        n = sum(len(o) for o in out)
    dt = time.time() - t0
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s on {cfg.device}]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
