"""sample.py: the KV cache, left padding, filtering, seeds, stop ids and logprobs."""

import os

import pytest
import torch

from model import UserError
from sample import filter_logits, generate, sample_next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["Once upon a time", "Lily and Tom went to the park. They", "The dog", "A"]


def test_cached_decoding_equals_full_forward(stories):
    """Prefill a left-padded batch, then decode token by token: every step's logits equal those of one
    full forward over the whole sequence (same mask)."""
    model, tok = stories
    ids = [tok.encode(p) for p in PROMPTS]
    T0, extra = max(map(len, ids)), 6
    g = torch.Generator().manual_seed(0)
    cont = torch.randint(3, 512, (len(ids), extra), generator=g)
    idx = torch.zeros(len(ids), T0 + extra, dtype=torch.long)
    mask = torch.zeros_like(idx, dtype=torch.bool)
    for i, p in enumerate(ids):
        idx[i, T0 - len(p):T0] = torch.tensor(p)
        mask[i, T0 - len(p):] = True
    idx[:, T0:] = cont
    with torch.no_grad():
        full = model(idx, mask=mask)
        cache = model.new_cache(len(ids), T0 + extra)
        steps = [model(idx[:, :T0], mask=mask[:, :T0], cache=cache)]
        steps.append(model(idx[:, T0:T0 + 2], mask=mask[:, T0:T0 + 2], cache=cache))   # a 2-token chunk
        for t in range(T0 + 2, T0 + extra):
            steps.append(model(idx[:, t:t + 1], mask=mask[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, 1)
    assert (cached - full)[mask].abs().max().item() < 1e-4


def test_greedy_row_in_padded_batch_equals_row_alone(stories):
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS]
    batched, blp = generate(model, prompts, 30, temperature=0, stop_ids=[])
    for p, b, lp in zip(prompts, batched, blp):
        alone, alp = generate(model, [p], 30, temperature=0, stop_ids=[])
        assert alone[0] == b
        assert max(abs(x - y) for x, y in zip(alp[0], lp)) < 1e-5


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=3))[0].tolist()
    assert kept == [False, True, True, False, True, False]
    assert torch.isfinite(filter_logits(logits, top_k=0)).all()          # 0 = off
    assert torch.isfinite(filter_logits(logits, top_k=10)).all()         # k >= V keeps all


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()
    assert kept(0.4) == [False, True, False, False, False]               # 0.4 alone reaches 0.4
    assert kept(0.5) == [False, True, True, False, False]                # 0.4 + 0.3
    assert kept(0.8) == [False, True, True, True, False]                 # 0.4 + 0.3 + 0.15 = 0.85
    assert kept(0.86) == [False, True, True, True, True]
    assert kept(0.01) == [False, True, False, False, False]              # the top token always stays
    assert kept(1.0) == [True] * 5
    # top-k first, then top-p on what is left (renormalised): {0.4, 0.3}/0.7 -> 0.571, 0.429
    both = torch.isfinite(filter_logits(logits, top_k=2, top_p=0.5))[0].tolist()
    assert both == [False, True, False, False, False]


def test_samples_follow_the_filtered_distribution():
    """The exponential race draws from softmax(logits / T) restricted to the kept tokens."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 40000
    logits = probs.log().expand(n, 4).clone()
    g = torch.Generator().manual_seed(0)
    nxt, lp = sample_next(logits, 1.0, 0, 1.0, g)
    freq = torch.bincount(nxt, minlength=4).float() / n
    assert (freq - probs).abs().max().item() < 0.01
    assert torch.allclose(lp, probs.log()[nxt], atol=1e-6)
    nxt, lp = sample_next(logits, 1.0, 0, 0.7, g)                        # keeps {0.5, 0.25} -> 2/3, 1/3
    freq = torch.bincount(nxt, minlength=4).float() / n
    assert (freq - torch.tensor([2 / 3, 1 / 3, 0, 0])).abs().max().item() < 0.01
    assert torch.allclose(lp.exp(), torch.tensor([2 / 3, 1 / 3])[nxt], atol=1e-6)
    nxt, _ = sample_next(logits, 0.5, 0, 1.0, g)                         # temperature sharpens: p^2 renormalised
    sharp = probs ** 2 / (probs ** 2).sum()
    freq = torch.bincount(nxt, minlength=4).float() / n
    assert (freq - sharp).abs().max().item() < 0.01


def test_logprobs_match_a_teacher_forced_recompute(stories):
    """What PPO relies on: the returned logprobs equal log_softmax(logits / T) of a fresh forward."""
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    T = 0.7
    out, lps = generate(model, prompts, 20, temperature=T, seed=3, stop_ids=[])
    for p, o, lp in zip(prompts, out, lps):
        idx = torch.tensor([p + o])
        with torch.no_grad():
            logp = (model(idx)[0, len(p) - 1:-1] / T).log_softmax(-1)
        ref = logp.gather(-1, torch.tensor(o)[:, None]).squeeze(-1)
        assert (torch.tensor(lp) - ref).abs().max().item() < 1e-4


def test_same_seed_same_output(stories):
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS]
    a = generate(model, prompts, 25, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, prompts, 25, temperature=1.0, top_p=0.9, seed=7)
    c = generate(model, prompts, 25, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a[0] != c[0]


def test_per_row_seeds_sample_a_row_the_same_in_any_batch(stories):
    """seed=[...] gives each row its own generator: a row's sample does not depend on the rows beside it (PPO's
    rollouts split over processes rely on this)."""
    model, tok = stories
    ids = [tok.encode(p) for p in PROMPTS]
    seeds = [11, 22, 33, 44]
    together, lp = generate(model, ids, 30, temperature=1.0, seed=seeds, stop_ids=[])
    for i in range(len(ids)):
        alone, lp1 = generate(model, [ids[i]], 30, temperature=1.0, seed=[seeds[i]], stop_ids=[])
        assert alone[0] == together[i]
        assert max(abs(a - b) for a, b in zip(lp1[0], lp[i])) < 1e-4
    pair, _ = generate(model, [ids[2], ids[0]], 30, temperature=1.0, seed=[seeds[2], seeds[0]], stop_ids=[])
    assert pair == [together[2], together[0]]
    assert generate(model, ids, 30, temperature=1.0, seed=[1, 2, 3, 4], stop_ids=[])[0] != together
    with pytest.raises(ValueError):
        generate(model, ids, 5, seed=[1, 2])


def test_each_row_stops_at_its_first_stop_id(stories):
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS]
    free, _ = generate(model, prompts, 40, temperature=1.0, seed=11, stop_ids=[])
    # stop each row at the first occurrence of a token that appears somewhere in row 0's output
    stop = free[0][5]
    cut, lps = generate(model, prompts, 40, temperature=1.0, seed=11, stop_ids=[stop])
    for f, c, lp in zip(free, cut, lps):
        n = f.index(stop) if stop in f else len(f)
        assert c == f[:n] and len(lp) == len(c)
    assert len(cut[0]) == 5


def test_default_stop_ids_are_the_models_eos(stories):
    """stories260K ends stories with BOS (generation_config eos [1, 2]); sampling stops there by default."""
    model, tok = stories
    out, _ = generate(model, [[tok.bos_id]] * 8, 400, temperature=1.0, seed=0)
    free, _ = generate(model, [[tok.bos_id]] * 8, 400, temperature=1.0, seed=0, stop_ids=[])
    assert any(len(o) < 400 for o in out)
    for o, f in zip(out, free):
        assert not set(o) & {1, 2}
        if len(o) < 400:
            assert f[len(o)] in (1, 2) and f[:len(o)] == o


def test_context_window_errors(stories):
    model, tok = stories
    ctx = model.config.max_position_embeddings
    with pytest.raises(UserError, match="context window"):
        generate(model, [[1] * ctx], 1)
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, [[1] * 10], ctx - 5)
    with pytest.raises(UserError, match="empty"):
        generate(model, [[1], []], 5)
    out, _ = generate(model, [[1] * 10], ctx - 10, temperature=0, stop_ids=[])   # exactly fills the window
    assert len(out[0]) == ctx - 10


@pytest.mark.parametrize("per_row", [False, True], ids=["one-generator", "row-generators"])
def test_zero_noise_never_picks_a_filtered_token(monkeypatch, per_row):
    """The sampler draws U uniform in [0, 1) and takes the argmax of p / -log(U). A draw whose noise is 0 (U rounding
    to 1) must not let a filtered token (p = 0, so 0 / 0) win. Every draw is forced to U = 1 here; the test checks
    that its patch was called, so it cannot pass by testing nothing."""
    calls = []

    def ones(*shape, generator=None, dtype=None, device=None):
        calls.append(shape)
        return torch.ones(*shape, dtype=dtype, device=device)
    monkeypatch.setattr(torch, "rand", ones)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 1.0, 4.0]])
    gen = [torch.Generator().manual_seed(i) for i in range(2)] if per_row else torch.Generator().manual_seed(0)
    nxt, lp = sample_next(logits, 1.0, 2, 1.0, gen)                      # top-k 2 keeps tokens {1, 2} and {0, 3}
    assert calls and nxt.tolist()[0] in (1, 2) and nxt.tolist()[1] in (0, 3) and torch.isfinite(lp).all()


def first_hit(tok, ids, strings):
    """The number of tokens up to and including the one whose decoded text first contains one of the strings."""
    for n in range(1, len(ids) + 1):
        if any(s in tok.decode(ids[:n]) for s in strings):
            return n
    return len(ids)


def test_stop_strings_end_each_row_where_its_text_first_contains_one(stories):
    """Strings across token boundaries, inside one token, several strings; rows end at different steps; a row that
    meets no string is exactly what it is without stop strings; a finished row costs no more forward passes."""
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS]
    free, free_lp = generate(model, prompts, 40, temperature=1.0, seed=5, stop_ids=[])
    texts = [tok.decode(f) for f in free]
    inside = next(p[1:3] for p in (tok.sp.id_to_piece(i) for i in free[1][3:]) if len(p.lstrip("\u2581")) >= 4)
    across = texts[0][12:20]                                     # spans several tokens
    assert len(tok.encode(across, bos=False)) > 1
    strings = [across, inside]
    sizes = []
    real_forward = model.forward

    def counting(idx, *a, **k):
        sizes.append(idx.shape[0])
        return real_forward(idx, *a, **k)
    model.forward = counting
    try:
        cut, lps = generate(model, prompts, 40, temperature=1.0, seed=5, stop_ids=[], stop_strings=strings,
                            tokenizer=tok)
    finally:
        del model.forward
    ns = [first_hit(tok, f, strings) for f in free]
    for f, flp, c, lp, n in zip(free, free_lp, cut, lps, ns):
        assert c == f[:n] and len(lp) == n                          # ends with the token that completed the string
        assert max(abs(x - y) for x, y in zip(lp, flp)) < 1e-5
    assert ns[0] < 40 and ns[1] < 40 and len(set(ns)) > 1            # rows end at different steps
    assert sizes[0] == len(prompts) and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(prompts)
    assert len(sizes) == max(ns)                                     # the prefill, then one pass a step until the last row ends
    # a caller cuts the text at the string
    t = tok.decode(cut[0])
    k = min(t.find(s) for s in strings if s in t)
    assert t[:k] == texts[0][:min(texts[0].find(s) for s in strings if s in texts[0])]
    # no string met: exactly the run without stop strings
    same, same_lp = generate(model, prompts, 40, temperature=1.0, seed=5, stop_ids=[], stop_strings=["\u00a7\u00a7"],
                             tokenizer=tok)
    assert same == free and same_lp == free_lp
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompts, 5, stop_strings=["x"])


def test_per_row_seeds_and_greedy_rows_survive_others_leaving(stories):
    """When rows leave the batch, the others sample exactly as before: per-row seeds, one seed, and greedy."""
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS]
    for kw in (dict(seed=[3, 4, 5, 6]), dict(seed=9), dict(temperature=0)):
        free, _ = generate(model, prompts, 30, stop_ids=[], **kw)
        stop = free[2][3]                                            # row 2 ends after 3 tokens
        cut, _ = generate(model, prompts, 30, stop_ids=[stop], **kw)
        for f, c in zip(free, cut):
            assert c == (f[:f.index(stop)] if stop in f else f)
        assert generate(model, prompts, 30, stop_ids=[stop], compact=False, **kw)[0] == cut   # finished rows kept


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


def test_shared_prefix_is_computed_once_with_the_same_output(stories, monkeypatch):
    """Prompts that begin alike (a few-shot prompt): the sampler prefills the common prefix once and reads it
    through cascade attention; greedy tokens, seeded samples, stop strings and logprobs are those of computing
    every row in full."""
    import model as modellib
    import sample
    model, tok = stories
    head = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her big brown dog every day. "
    tails = ["One day", "The dog saw a big red ball and", "Lily was sad.", "Then"]
    prompts = [tok.encode(head + t, bos=True) for t in tails]
    P = sample.shared_prefix_length(prompts)
    assert sample.SHARE_PREFIX <= P < min(map(len, prompts))
    assert prompts[0][:P] == prompts[2][:P] and prompts[0][P] != prompts[1][P]
    assert sample.shared_prefix_length([prompts[0], prompts[0]]) == len(prompts[0]) - 1   # one own token each
    calls = []
    real = modellib.cascade_attention
    monkeypatch.setattr(modellib, "cascade_attention", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    for kw in (dict(temperature=0, stop_ids=[]), dict(temperature=1.0, top_p=0.9, seed=5, stop_ids=[]),
               dict(temperature=1.0, seed=[1, 2, 3, 4]),
               dict(temperature=1.0, top_k=20, seed=9, stop_strings=[".", " and"], tokenizer=tok)):
        calls.clear()
        shared, slp = generate(model, prompts, 40, **kw)
        assert calls and set(calls) == {P}              # every layer, every step read the prefix, once a batch
        calls.clear()
        full, flp = generate(model, prompts, 40, **kw, share_prefix=0)
        assert not calls
        assert shared == full
        assert max(abs(a - b) for x, y in zip(slp, flp) for a, b in zip(x, y)) < 1e-4   # fp32 rounding
    calls.clear()
    generate(model, [prompts[0]], 5, temperature=0)               # one row, and a short common prefix: no sharing
    generate(model, [tok.encode(t, bos=True) for t in tails], 5, temperature=0)
    assert not calls


@pytest.mark.slow
def test_shared_prefix_on_a_real_chat_model(smollm2):
    """SmolLM2 (GQA 9/3, byte-level BPE) with a one-shot HHH prompt: sharing the prompt's prefix gives the tokens and
    logprobs of computing every row in full, greedy and sampled."""
    import comparisons
    from model import load
    model, tok = load(smollm2)
    preamble, demos = comparisons.read_demos(os.path.join(ROOT, "data", "almost", "HHH_prompt.txt"))
    prompts = [comparisons.turn_prompt(tok, "dialogue", preamble, demos, 1, [("user", q)])
               for q in ("How do I boil an egg?", "What is the capital of France?", "Tell me a joke.")]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)):
        shared, slp = generate(model, prompts, 16, stop_ids=[], **kw)
        full, flp = generate(model, prompts, 16, stop_ids=[], share_prefix=0, **kw)
        assert shared == full
        assert max(abs(a - b) for x, y in zip(slp, flp) for a, b in zip(x, y)) < 1e-3


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


# the tokens this sampler draws for these seeds (recorded once): a change to the draws, the filters or the loop shows
GOLDEN = {
    "row_seeds": [[432, 383, 286, 261, 268, 414, 422, 395, 405, 426, 405, 401, 396, 298, 414, 299, 267, 410, 435, 293,
                   275, 272, 420, 287],
                  [391, 266, 267, 268, 425, 422, 262, 287, 316, 415, 299, 267, 280, 294, 402, 265, 420, 372, 421, 360,
                   419, 426, 342, 280],
                  [269, 279, 325, 360, 382, 276, 298, 314, 406, 426, 342, 382, 276, 261, 282, 417, 451, 451, 412, 322,
                   265, 315, 300, 264],
                  [416, 416, 412, 397, 354, 419, 267, 337, 410, 408, 419, 292, 411, 322, 265, 262, 379, 426, 338, 286,
                   399, 344, 444, 429]],
    "top_p": [[432, 383, 286, 261, 298, 347, 418, 268, 315, 418, 395, 368, 414, 430, 426, 368, 414, 430, 401, 396, 267,
               344, 294, 410],
              [397, 355, 267, 352, 379, 269, 262, 415, 412, 276, 262, 287, 411, 280, 414, 421, 304, 419, 426, 342, 391,
               266, 267, 282],
              [397, 396, 404, 295, 265, 352, 414, 340, 426, 274, 287, 286, 399, 270, 379, 428, 420, 422, 269, 263, 415,
               275, 411, 426],
              [276, 412, 412, 428, 411, 286, 261, 376, 298, 315, 421, 426, 410, 447, 416, 416, 412, 391, 266, 267, 262,
               415, 327, 311]],
    "top_k_stop": [[432, 383, 286, 261, 376, 298, 315, 421, 395, 317],
                   [334, 427, 302, 266, 265, 282, 412, 271, 413, 299, 432, 366, 394, 261, 370, 259, 276, 411],
                   [286, 399, 259, 325, 303, 428, 305], [416, 416, 412, 286, 261, 376, 298, 315, 421, 395, 317]],
}
GOLDEN_RUNS = {"row_seeds": dict(temperature=1.0, seed=[11, 12, 13, 14]),
               "top_p": dict(temperature=1.0, top_p=0.9, seed=5),
               "top_k_stop": dict(temperature=0.8, top_k=40, seed=6, stop_ids=[426])}   # 426: "."


@pytest.mark.parametrize("check_every", [1, 8])
def test_seeded_samples_are_the_recorded_ones_however_often_the_loop_looks(stories, check_every):
    """The same seeds give the recorded tokens, whether the loop looks for ended rows every token (a CPU's default) or
    every 8 (a GPU's): rows that ended run on between looks, and their extra tokens are dropped."""
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS]
    for name, kw in GOLDEN_RUNS.items():
        assert generate(model, prompts, 24, check_every=check_every, **kw)[0] == GOLDEN[name], name


def test_decoding_makes_at_most_one_host_sync_a_token(stories):
    """Counted per decoded token with a dispatch counter (bench.DispatchCounter: a value read on the host, a
    data-dependent shape, a host-to-device copy): plain sampling, and PPO's rollouts (a seed per row, rows ending at
    EOS and leaving the batch) make one sync a token when the loop looks every token, one in 8 tokens when it looks
    every 8; the loop it replaced made 4 or 5."""
    from bench import per_token
    model, tok = stories
    prompts = [tok.encode(p) for p in PROMPTS]
    for kw in (dict(temperature=1.0, seed=3, stop_ids=[]), dict(temperature=1.0, seed=[1, 2, 3, 4], stop_ids=[426])):
        for every in (1, 8):
            _, syncs = per_token(lambda n: generate(model, prompts, n, check_every=every, **kw), 16)
            assert syncs == 1 / every if kw["stop_ids"] == [] else syncs <= 1 / every   # (rows end early: fewer)


def test_top_p_over_the_whole_sorted_vocabulary_needs_no_sync_and_keeps_the_same_set():
    """A GPU ranks the whole vocabulary for top-p (no sync); a CPU ranks 256 candidates first and sorts only rows they
    do not cover (a look at the data): the same tokens are kept, for peaked and for flat rows."""
    from bench import DispatchCounter
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 1000) * 8, torch.randn(3, 1000) * 0.1])    # peaked rows, then flat ones
    for p in (0.5, 0.9, 0.99):
        with DispatchCounter() as c:
            full = filter_logits(logits, top_p=p, full_sort=True)
        assert c.syncs == 0
        assert torch.equal(torch.isfinite(full), torch.isfinite(filter_logits(logits, top_p=p, full_sort=False)))
