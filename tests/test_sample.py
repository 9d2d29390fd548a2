"""sample.py: the KV cache, left padding, filtering, seeds, stop ids and logprobs, shared prefixes, host syncs, the CLI,
and FSDP (every process runs as many forwards)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES, edit_config, launch
from model import Llama, UserError
from sample import filter_logits, generate, sample_next

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
    prompted = comparisons.Speaker(model, tok, "dialogue", preamble, demos, 1, 16)
    prompts = [prompted.prompt([("user", q)])
               for q in ("How do I boil an egg?", "What is the capital of France?", "Tell me a joke.")]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)):
        shared, slp = generate(model, prompts, 16, stop_ids=[], **kw)
        full, flp = generate(model, prompts, 16, stop_ids=[], share_prefix=0, **kw)
        assert shared == full
        assert max(abs(a - b) for x, y in zip(slp, flp) for a, b in zip(x, y)) < 1e-3


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


# -----------------------------------------------------------------------------
# the CLI: a message and exit status 2, never a traceback

def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["--model=/nonexistent/llama"], ["/nonexistent/llama", "no such model folder"]),
    (["--bogus=1"], ["unknown flag --bogus"]),
    (["--temperature=hot"], ["--temperature", "float"]),
    (["--prompt=" + "Once upon a time " * 200], ["context window", "shorten"]),
    (["--max_new_tokens=600"], ["max_new_tokens", "context window"]),
    (["--prompt_file=/nonexistent.txt"], ["/nonexistent.txt", "prompt file"]),
    (["--dtype=int3"], ["--dtype"]),
])
def test_cli_errors(args, words):
    r = cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.slow
def test_cli_error_on_bad_config(ckpt):
    edit_config(ckpt, model_type="bert")
    r = cli(f"--model={ckpt}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "config.json" in r.stderr


@pytest.mark.slow
def test_cli_samples(tmp_path):
    r = cli("--prompt=Once upon a time", "--temperature=0", "--max_new_tokens=40", "--num_samples=1", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside "
                               "in the park. One day, she saw a big, red ball.")
    f = tmp_path / "p.txt"
    f.write_text("The dog\n\nLily and Tom\n")
    r = cli(f"--prompt_file={f}", "--num_samples=2", "--max_new_tokens=20", "--stream=false", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("The dog") == 2 and r.stdout.count("Lily and Tom") == 2


# -----------------------------------------------------------------------------
# a real chat model, and FSDP: every process runs as many forwards

@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_and_sample_py_streams_it(smollm2):
    """sample.py on a real chat model (byte-level BPE, no BOS, ChatML): our greedy tokens equal transformers'."""
    transformers = pytest.importorskip("transformers")
    from model import load
    from sample import generate
    model, tok = load(smollm2)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, bos=True)
    ours, _ = generate(model, [ids], 20, temperature=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    n = len(ours[0])
    assert ours[0] == theirs[:n] and (n == 20 or theirs[n] == tok.eos_id), (tok.decode(ours[0]), tok.decode(theirs))
    assert "Paris" in tok.decode(ours[0])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--model={smollm2}", f"--prompt={prompt}",
                        "--temperature=0", "--num_samples=1", "--max_new_tokens=20", "--device=cpu"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0 and tok.decode(ours[0]) in r.stdout, r.stdout + r.stderr


SYNCED_SAMPLING = """
import json, sys
import torch
from common import rank
from model import load
from sample import generate, shared_prefix_length, SHARE_PREFIX
from trainer import ScaleConfig, end_distributed, prepare_for_training, setup_distributed
setup_distributed("cpu")
sharded, tok = load(sys.argv[1])
alone, _ = load(sys.argv[1])                       # the same model unsharded: what each process must get
prepare_for_training(sharded, ScaleConfig(device="cpu", fsdp=True), torch.float32)
enc = lambda t: tok.encode(t, bos=True)
out = {}
# 1. process 0's rows end at their first token (the stop id is the token each samples first); process 1's never stop
prompts = [[enc("Tom has a ball.")], [enc("Once upon a time"), enc("Lily saw a big dog.")]][rank()]
first = [t[0] for t in generate(alone, prompts, 1, temperature=0, stop_ids=[])[0]]
stop = first if rank() == 0 else []
out["ends"] = generate(sharded, prompts, 16, temperature=0, stop_ids=stop)[0]
assert out["ends"] == generate(alone, prompts, 16, temperature=0, stop_ids=stop)[0], out
assert (rank() == 0) == (max(map(len, out["ends"])) == 0) and (rank() == 0 or min(map(len, out["ends"])) == 16)
# 2. prompts that share a long prefix on process 0 only (prefilled once there: one forward more than process 1)
story = enc("Once upon a time, there was a little girl named Lily. She loved to play in the park with her "
            "friends every day. One day she saw a big red ball.")
prompts = [[story + tok.encode(" She", bos=False), story + tok.encode(" Tom", bos=False)],
           [enc("The sun was hot."), enc("A dog ran.")]][rank()]
out["prefix"] = shared_prefix_length(prompts)
assert (rank() == 0) == (out["prefix"] >= SHARE_PREFIX)
out["shared"] = generate(sharded, prompts, 12, temperature=1.0, seed=[1, 2])[0]
assert out["shared"] == generate(alone, prompts, 12, temperature=1.0, seed=[1, 2], share_prefix=0)[0], out
open(f"{sys.argv[2]}/out{rank()}.json", "w").write(json.dumps({"rank": rank(), **out}))
del sharded
end_distributed()
"""


@pytest.mark.slow
def test_fsdp_sampling_keeps_the_processes_in_step(tmp_path):
    """Under FSDP every forward gathers the weights from all processes, so the sampler must run as many forwards in
    each: here process 0's rows all end at their first token while process 1's decode to the budget, and then only
    process 0's prompts share a prefix long enough to be prefilled once. Without the agreement the processes wait for
    each other for ever (the timeout fails the test); with it every process gets what one process alone gets."""
    script = tmp_path / "synced.py"
    script.write_text(SYNCED_SAMPLING)
    launch(str(script), [STORIES, str(tmp_path)], 2, tmp_path, timeout=120)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    assert len(outs) == 2 and outs[0]["ends"] == [[]] and all(len(t) == 16 for t in outs[1]["ends"])


FSDP_ROLLOUT_AND_SAVE = """
import json, sys
import torch
from bench import DispatchCounter
from common import rank
from memory import AllocationTracker
from model import load
from sample import generate
from sft import Config
from trainer import end_distributed, prepare_for_training, setup_distributed
folder, out_dir = sys.argv[1:]
setup_distributed("cpu")
model, tok = load(folder)
alone, _ = load(folder)
prepare_for_training(model, Config(device="cpu", fsdp=True), torch.float32)
prompts = [tok.encode(p) for p in ("Once upon a time", "The dog")][rank():rank() + 1]
out = {"rank": rank(), "gathers": {}}
for n in (4, 16):
    with DispatchCounter() as c:
        toks, _ = generate(model, prompts, n, temperature=1.0, seed=[rank()], stop_ids=[])
    out["gathers"][n] = sum(v for k, v in c.collectives.items() if "allgather" in k or "all_gather" in k)
    assert toks == generate(alone, prompts, n, temperature=1.0, seed=[rank()], stop_ids=[])[0]
largest = max(p.numel() * p.element_size() for p in alone.parameters())
with AllocationTracker() as t:
    base = t.live
    model.save_pretrained(out_dir + "/saved", max_shard_bytes=60_000)
    out.update(save_peak=t.peak - base, save_after=t.live - base, largest=largest)
open(f"{out_dir}/out{rank()}.json", "w").write(json.dumps(out))
del model
end_distributed()
"""


@pytest.mark.slow
def test_fsdp_rollouts_gather_once_and_saves_hold_one_tensor_at_a_time(tmp_path):
    """FSDP over 2 gloo processes. A rollout gathers every block's weights once (sample.gathered), not once a token:
    the all-gathers of 4 and of 16 decoded tokens are as many, and the tokens are one process's. A save gathers one
    tensor at a time (a collective) and writes shards: process 1 keeps nothing and never holds more than one full
    tensor in flight; process 0 holds one shard and the tensor in flight; the sharded folder loads in transformers."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_ROLLOUT_AND_SAVE)
    launch(str(script), [STORIES, str(tmp_path)], 2, tmp_path, timeout=180)
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    for o in outs:
        assert o["gathers"]["4"] == o["gathers"]["16"] > 0
    # (a gathered tensor is freed when gloo's worker thread lets go of it, a moment after the save drops it: the one
    # before may still be there when the next arrives; the whole model is 8x the largest tensor)
    zero, one = outs
    assert one["save_peak"] <= 2 * one["largest"] and one["save_after"] < one["largest"] / 100
    assert zero["save_peak"] <= 60_000 + 2 * zero["largest"] and zero["save_after"] < zero["largest"] / 100
    files = sorted(os.listdir(tmp_path / "saved"))
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 5
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    ours = Llama.from_pretrained(STORIES)
    idx = torch.tensor([[1, 400, 300, 200, 100]])
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max() < 1e-4
