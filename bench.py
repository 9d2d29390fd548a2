"""
Decoding speed of sample.generate against transformers' generate() on the same weights, in one process.
Prints medians and ratios (machines here are noisy: trust the ratios, not one number).

    python bench.py                      # all cases (needs transformers: pip install -r requirements-test.txt)
    python bench.py --cases=260k_b1 --repeats=5

Cases (CPU fp32 unless --device, greedy, 128 new tokens, no early stop):
  260k_b1    bundled stories260K, batch 1
  134m_b1    a 134M LLaMA shape (dim 768, 12 layers, 12 heads, ffn 2048, vocab 32000, untied, random weights),
             batch 1; also its memory-bandwidth bound: weight bytes read per token / measured copy bandwidth
  260k_b16   stories260K, batch 16, prompts of 1..60 tokens
  134m_b16   the 134M shape, batch 16, prompts of 1..60 tokens
  rm_260k    reward-model training throughput (forward + backward of the Bradley-Terry loss, pairs/s) against
             transformers' LlamaForSequenceClassification: stories260K trunk, 16 pairs of 20..250 tokens
  rm_134m    the same on the 134M shape, 4 pairs of 20..250 tokens
  stops      the responses stage's sampling before (rows run to the budget unless they emit EOS, and stay in the
             batch when they do) and after (stop strings end a row where its kept text ends; finished rows leave
             the batch): the bundled story generators, and with --model (an HF folder of SmolLM2 or another chat
             model) the HHH prompt's dialogue format; tokens generated per kept response, wall time, equal texts
  stages     the responses and self-play stages (almost.py's own functions, --queries seed queries) before and
             after stop strings, as stops: the story profile, and with --model the chat profile on that model; tokens
             generated per sampled turn, wall time of each stage, equal files written
  prefix     prefix sharing in the sampler, with --model (SmolLM2 or another chat model): the responses stage's
             generation with the 5-shot HHH prompt against the 0-shot prompt (same queries, --new_tokens each, no
             early stop), and against every row computed in full (share_prefix=0); equal tokens, wall time ratios
  novelty    the ROUGE-L novelty filter's time per new query: every entry checked, against the index
             (comparisons.NoveltyPool); equal decisions. Synthetic queries (pools of 1,000, 10,000 and 100,000) and the first
             human turns of the Anthropic HH test dialogues (pools of 500 and 2,000 novel ones)
  tok_bpe    tokenizer.py's byte-level BPE against transformers' tokenizer (Rust) on the Anthropic HH test dialogues,
             encode tokens/s, with --tokenizer (a folder with tokenizer.json, e.g. SmolLM2's); checks equal ids

GPU cases (not in the default list; they need CUDA and about 40 GB free; --shape=tiny runs their code path on the
CPU, without memory figures):
  decode_7b  bf16 decode tokens/s of a random model of --shape (llama-2-7b), batch 1, against its bandwidth bound
             (weight bytes per token / measured device copy bandwidth), and the host syncs per decoded token
             (DispatchCounter; on CUDA also CUDA's own count)
  rm_step_7b one reward-model training step (rm.train) at --shape with LoRA (rank 16) and gradient checkpointing:
             peak memory (torch.cuda.max_memory_allocated) against memory.py's plan of the same run
  ppo_step_7b one PPO step (ppo.train) at --shape with LoRA and checkpointing: peak memory against the plan
  gathers    FSDP's all-gathers per rollout of 8 and of 64 tokens (2 gloo processes on the CPU, a tiny model)

    python bench.py --device=cuda --cases=decode_7b,rm_step_7b,ppo_step_7b,gathers
"""
import json
import math
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import UserError, model_folder, parse_args, run_cli
from model import Llama, LlamaConfig, pad_batch
from sample import generate
from tokenizer import Tokenizer, format_dialogue

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    cases: str = "260k_b1,134m_b1,260k_b16,134m_b16,rm_260k,rm_134m"  # comma-separated, see above
    new_tokens: int = 128          # tokens decoded per run
    repeats: int = 3               # runs per case; the median is reported
    device: str = "cpu"            # cpu or cuda
    shape: str = "llama-2-7b"      # the GPU cases' model shape: a memory.py shape name, or "tiny"
    tokenizer: str = ""            # tok_bpe: a model folder with a tokenizer.json (SmolLM2's, Llama-3's, ...)
    model: str = ""                # stops, prefix: a chat model folder (SmolLM2-135M-Instruct) for the dialogue-format run
    queries: int = 16              # stops, prefix: queries per generator (prefix: the batch)


# -----------------------------------------------------------------------------
# counting what a GPU would pay for, on any device: host syncs, aten ops, collectives

class DispatchCounter(TorchDispatchMode):
    """with DispatchCounter() as c: ... counts the aten ops run inside (c.ops), the host syncs a CUDA run of them
    would make (c.syncs) and the collectives (c.collectives, by name). A sync: a value read on the host (item(),
    bool(), int(), tolist(), .cpu(), .numpy()), an op whose output size depends on the data (nonzero, masked_select,
    unique, indexing with a boolean mask), or host data copied to the device (torch.tensor of a list); on a GPU each
    waits for every kernel queued before it. On a CPU the tensors are host tensors, so every such read counts."""

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.sync_ops, self.collectives = 0, 0, Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops += 1
        if (name in self.SYNC_OPS or (name == "lift_fresh" and args[0].dim() > 0)     # (0-d: a scalar, no copy)
                or (name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple))
                    and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]))):
            self.syncs += 1
            self.sync_ops[name] += 1
        if func.namespace in ("c10d", "_c10d_functional"):
            self.collectives[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):   # reads that never reach the dispatcher on a host tensor
        self.patched = {}
        for method in ("tolist", "cpu", "numpy"):
            real = getattr(torch.Tensor, method)
            self.patched[method] = torch.Tensor.__dict__.get(method)

            def counting(t, *a, _real=real, _name=method, **k):
                self.syncs += 1
                self.sync_ops[_name] += 1
                return _real(t, *a, **k)
            setattr(torch.Tensor, method, counting)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, orig in self.patched.items():
            if orig is None:
                delattr(torch.Tensor, method)
            else:
                setattr(torch.Tensor, method, orig)
        return super().__exit__(*exc)


def per_token(run, tokens):
    """The marginal count per decoded token of a sampling call: run(n) counted at `tokens` and at twice as many, so
    the prefill's and the return's counts cancel. -> (ops per token, syncs per token)."""
    counts = []
    for n in (tokens, 2 * tokens):
        with DispatchCounter() as c:
            run(n)
        counts.append(c)
    return (counts[1].ops - counts[0].ops) / tokens, (counts[1].syncs - counts[0].syncs) / tokens


def timed(fn, repeats):
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(device, nbytes=512 * 2**20, repeats=5):
    """Bytes moved per second by a large tensor copy (read + write), the usual STREAM 'copy' figure."""
    a = torch.ones(nbytes // 4, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: (b.copy_(a), torch.cuda.synchronize() if a.is_cuda else None), repeats)
    return 2 * nbytes / t


def weight_bytes_per_token(model):
    """Bytes of weights one decode step reads: every matrix and norm, but only one row of the embedding
    (unless it is tied to the output head, which reads it all)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        w = model.embed_tokens.weight
        n -= w.numel() * w.element_size()
    return n


def make_134m(device):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)
    torch.manual_seed(0)
    return Llama(cfg).init_weights().to(device).eval()


def hf_model(ours, device):
    """transformers' LlamaForCausalLM on the same weights, through our own save_pretrained."""
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
    hf.generation_config.eos_token_id = None  # run all new tokens, as we do with stop_ids=[]
    hf.generation_config.pad_token_id = 0
    return hf


def sampling_work(model, prompts, budget, **kw):
    """generate() with a count of the rows of every forward pass: (outputs, row-steps, seconds)."""
    rows, real = [0], model.forward

    def counting(idx, *a, **k):
        rows[0] += idx.shape[0]
        return real(idx, *a, **k)
    model.forward = counting
    try:
        t0 = time.perf_counter()
        out, _ = generate(model, prompts, budget, temperature=1.0, top_p=0.9, seed=0, **kw)
        return out, rows[0] - len(prompts), time.perf_counter() - t0           # (the prefill's rows left out)
    finally:
        del model.forward


def run_stops_case(cfg):
    import almost
    import comparisons
    from model import load
    from tokenizer import TURN_ENDS, postprocess_response
    runs = []   # (name, model, tok, prompts, budget, the kept text of an output, stop strings)
    seeds = comparisons.read_seeds(os.path.join(HERE, "data", "stories", "seed_openings.txt"))[1][:cfg.queries]
    for g in almost.PROFILES["stories"].generators:
        model, tok = load(g.model)
        prompted = comparisons.speaker(g, model, tok, "story")
        prompts = [prompted.prompt([("user", q)]) for q in seeds]
        runs.append((g.name, model, tok, prompts, g.max_new_tokens, lambda t, tok=tok: tok.decode(t), None))
    if cfg.model:
        model, tok = load(cfg.model)
        hhh = comparisons.Generator("hhh", cfg.model, os.path.join(HERE, "data", "almost", "HHH_prompt.txt"), 3, 200)
        prompted = comparisons.speaker(hhh, model, tok, "dialogue")
        queries = comparisons.read_seeds(os.path.join(HERE, "data", "almost", "seed_prompts.txt"))[1][:cfg.queries]
        prompts = [prompted.prompt([("user", q)]) for q in queries]
        runs.append((f"{os.path.basename(cfg.model.rstrip('/'))}, HHH 3-shot", model, tok, prompts, 200,
                     lambda t, tok=tok: postprocess_response(tok.decode(t)), TURN_ENDS))
    for name, model, tok, prompts, budget, kept, stops in runs:
        before, work_b, t_b = sampling_work(model, prompts, budget, compact=False)
        after, work_a, t_a = sampling_work(model, prompts, budget, stop_strings=stops, tokenizer=tok)
        same = [kept(a) for a in after] == [kept(b) for b in before]
        # tokens generated past the end of the kept text: those after the shortest prefix that already gives it
        past = [len(a) - next(k for k in range(len(a) + 1) if kept(a[:k]) == kept(a)) for a in after]
        print(f"stops     {name}: {len(prompts)} responses, tokens generated per response {work_b / len(prompts):.1f} "
              f"-> {work_a / len(prompts):.1f}, kept {sum(map(len, after)) / len(prompts):.1f}; {t_b:.2f} s -> "
              f"{t_a:.2f} s ({t_b / t_a:.2f}x); kept texts equal: {same}; tokens past the kept text: median "
              f"{statistics.median(past):.0f}, max {max(past)}", flush=True)


def run_stages_case(cfg):
    """The responses and self-play stages as almost.py runs them (stage_responses, stage_selfplay: every generator
    on --queries seed queries, self-play best of n and its n = 1 baseline), before and after stop strings: before,
    every sampler call runs each row to its budget or EOS (no stop strings, finished rows kept in the batch); after,
    as the stages run. Same seeds, so the files written must be equal. The reward model that picks self-play's
    candidates is the base model with a fresh head: its choices cost the same as a trained one's."""
    import almost
    import comparisons
    from common import read_records
    from rm import RewardModel
    real = comparisons.generate
    for profile, model in [("stories", "")] + ([("chat", cfg.model)] if cfg.model else []):
        with tempfile.TemporaryDirectory() as d:
            def config(out):
                return almost.resolve(almost.Config(profile=profile, model=model, out=out, n_queries=cfg.queries,
                                                    reward_model=os.path.join(d, "rm")))
            queries = comparisons.read_seeds(config(d).seeds)[1][:cfg.queries]
            RewardModel.from_pretrained(config(d).rm.model).save_pretrained(os.path.join(d, "rm"))
            files, figures = {}, {}
            for mode in ("before", "after"):
                run = config(os.path.join(d, mode))
                os.makedirs(run.out)
                with open(os.path.join(run.out, "queries.jsonl"), "w") as f:
                    f.writelines(json.dumps({"id": i, "query": q}) + "\n" for i, q in enumerate(queries))
                for stage in (almost.stage_responses, almost.stage_selfplay):
                    work = {"texts": 0, "tokens": 0}

                    def counted(model, prompts, max_new_tokens, work=work, mode=mode, **kw):
                        if mode == "before":
                            kw.update(stop_strings=None, compact=False)
                        work["texts"] += len(prompts)
                        return real(model, prompts, max_new_tokens, **kw,
                                    on_token=lambda step, ids: work.__setitem__("tokens", work["tokens"] + len(ids)))
                    comparisons.generate = counted
                    try:
                        t0 = time.perf_counter()
                        stage(run)
                        figures[mode, stage.__name__] = (work["tokens"] / work["texts"], time.perf_counter() - t0)
                    finally:
                        comparisons.generate = real
                files[mode] = {name: read_records(os.path.join(run.out, name)) for name in sorted(os.listdir(run.out))
                               if name.endswith(".jsonl") and name != "queries.jsonl"}
            for stage in ("stage_responses", "stage_selfplay"):
                (tb, sb), (ta, sa) = figures["before", stage], figures["after", stage]
                print(f"stages    {profile} {stage[6:]:9s}: tokens generated per sampled turn {tb:6.1f} -> {ta:6.1f}, "
                      f"wall {sb:6.1f} s -> {sa:6.1f} s ({sb / sa:.2f}x)", flush=True)
            print(f"stages    {profile}: {len(queries)} queries; files written equal before and after "
                  f"({', '.join(files['after'])}): {files['before'] == files['after']}", flush=True)


def run_prefix_case(cfg):
    """The responses stage's generation with the 5-shot HHH prompt (a long prefix every row shares) against the
    0-shot prompt on the same queries and lengths, and against the sampler without prefix sharing."""
    import comparisons
    from model import load
    if not cfg.model:
        raise UserError("--cases=prefix needs --model: a chat model folder (SmolLM2-135M-Instruct, say).")
    model, tok = load(cfg.model)
    hhh = comparisons.Generator("hhh", cfg.model, os.path.join(HERE, "data", "almost", "HHH_prompt.txt"), 5, 200)
    prompted = comparisons.speaker(hhh, model, tok, "dialogue")
    queries = comparisons.read_seeds(os.path.join(HERE, "data", "almost", "seed_prompts.txt"))[1][:cfg.queries]
    prompts = {s: [prompted.prompt([("user", q)], shots=s) for q in queries] for s in (0, 5)}
    kw = dict(temperature=1.0, top_p=0.9, seed=0, stop_ids=[])   # no early stop: every row makes new_tokens
    runs = [("0-shot", prompts[0], {}), ("5-shot, prefix shared", prompts[5], {}),
            ("5-shot, every row in full", prompts[5], dict(share_prefix=0))]
    times, outs = {}, {}
    for name, ps, extra in runs:
        def run(ps=ps, extra=extra, name=name):
            outs[name] = generate(model, ps, cfg.new_tokens, **kw, **extra)
        times[name] = timed(run, cfg.repeats)
    from sample import shared_prefix_length
    P = {s: shared_prefix_length(prompts[s]) for s in (0, 5)}
    for s in (0, 5):
        print(f"prefix    {s}-shot prompts: {min(map(len, prompts[s]))}..{max(map(len, prompts[s]))} tokens, "
              f"{P[s]} shared")
    base = times["0-shot"]
    for name, _, _ in runs:
        print(f"prefix    {name}: {len(queries)} rows x {cfg.new_tokens} new tokens, {times[name]:.2f} s, "
              f"{times[name] / base:.2f}x the 0-shot run", flush=True)
    a, b = outs["5-shot, prefix shared"], outs["5-shot, every row in full"]
    print(f"prefix    shared vs in full: equal tokens {a[0] == b[0]}, largest logprob difference "
          f"{max(abs(x - y) for r, s in zip(a[1], b[1]) for x, y in zip(r, s)):.1e}", flush=True)


def run_novelty_case(cfg):
    import random
    from comparisons import NoveltyPool, is_novel, rouge_tokens
    rng = random.Random(0)
    common = "what how is the a to of in can i you do for my and why best way should".split()

    def query():   # query-like: 40% function words, the rest content words of a Zipf(1) vocabulary of 20,000
        return rouge_tokens(" ".join(rng.choice(common) if rng.random() < 0.4 else f"w{int(math.exp(rng.random() * math.log(20000)))}"
                                     for _ in range(rng.randint(4, 16))))
    def measure(label, sizes, stream, new):
        pool, plain = NoveltyPool(), []
        for size in sizes:
            while len(plain) < size:
                q = next(stream)
                if q and pool.is_novel(q):
                    pool.add(q)
                    plain.append(q)
            check = new if size <= 10000 else new[:20]      # every entry checked: about 1 s a query at 100,000
            t0 = time.perf_counter()
            slow = [is_novel(q, plain) for q in check]
            t1 = time.perf_counter()
            fast = timed(lambda: [pool.is_novel(q) for q in new], cfg.repeats)
            cands = statistics.fmean(len(pool.candidates(q)) for q in new)
            print(f"novelty   {label} pool {size:6d}: every entry {1e3 * (t1 - t0) / len(check):7.2f} ms/query  indexed "
                  f"{1e3 * fast / len(new):6.3f} ms/query  ({(t1 - t0) / len(check) / (fast / len(new)):.0f}x), "
                  f"{cands:.2f} candidates (LCS computed) a query; equal decisions on {len(check)}: "
                  f"{slow == [pool.is_novel(q) for q in check]}", flush=True)
    measure("synthetic", (1000, 10000, 100000), iter(query, None), [query() for _ in range(200)])
    # real user queries: the first human turn of each Anthropic HH test dialogue (text for timing only)
    import gzip
    texts = []
    for split in ("harmless-base", "helpful-base"):
        with gzip.open(os.path.join(HERE, "data", "hh-rlhf", split, "test.jsonl.gz"), "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["chosen"].split("\n\nHuman:")[1].split("\n\nAssistant:")[0] for line in f]
    random.Random(0).shuffle(texts)
    measure("HH queries", (500, 2000), map(rouge_tokens, texts[:-300]), [rouge_tokens(t) for t in texts[-300:]])


def run_tokenizer_case(cfg):
    """Encode every Anthropic HH test dialogue (chosen and rejected, 9,332 texts), ours against transformers' fast
    tokenizer, one text a call; the first pass of ours fills its word cache, so the median includes warm passes."""
    import gzip
    from transformers import AutoTokenizer
    if not os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")):
        raise UserError(f"--tokenizer={cfg.tokenizer!r}: give a folder that holds a tokenizer.json.")
    texts = []
    for split in ("harmless-base", "helpful-base"):
        with gzip.open(os.path.join(HERE, "data", "hh-rlhf", split, "test.jsonl.gz"), "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                texts += [d["chosen"], d["rejected"]]
    t0 = time.perf_counter()
    ours = Tokenizer(cfg.tokenizer)
    t_load = time.perf_counter() - t0
    hf = AutoTokenizer.from_pretrained(cfg.tokenizer)
    n = sum(len(ours.encode(t, bos=False)) for t in texts)
    same = all(ours.encode(t, bos=False) == hf(t, add_special_tokens=False)["input_ids"] for t in texts)
    ours.bpe.cache.clear()
    t_ours = timed(lambda: [ours.encode(t, bos=False) for t in texts], cfg.repeats)
    t_hf = timed(lambda: [hf(t, add_special_tokens=False)["input_ids"] for t in texts], cfg.repeats)
    print(f"tok_bpe   {len(texts)} texts, {n} tokens: ours {n / t_ours:,.0f} tok/s  transformers {n / t_hf:,.0f} tok/s  "
          f"ratio {t_hf / t_ours:4.2f}x  (ours loads in {t_load:.2f} s; identical ids: {same})", flush=True)


def run_case(name, cfg):
    dev = torch.device(cfg.device)
    ours = Llama.from_pretrained(os.path.join(HERE, "data", "stories260K"), device=dev) if name.startswith("260k") \
        else make_134m(dev)
    hf = hf_model(ours, dev)
    B = 16 if name.endswith("b16") else 1
    g = torch.Generator().manual_seed(0)
    lens = [1 + (i * 37) % 60 for i in range(B)] if B > 1 else [8]
    V = ours.config.vocab_size
    prompts = [[1] + torch.randint(3, V, (n - 1,), generator=g).tolist() for n in lens]

    # transformers: left-padded batch with an attention mask, greedy, no stop
    T0 = max(lens)
    ids = torch.zeros(B, T0, dtype=torch.long)
    am = torch.zeros(B, T0, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T0 - len(p):] = torch.tensor(p)
        am[i, T0 - len(p):] = 1
    ids, am = ids.to(dev), am.to(dev)
    n = cfg.new_tokens

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_ours():
        return generate(ours, prompts, n, temperature=0, stop_ids=[])

    # same greedy tokens from both (a cheap check that the benchmark compares like with like)
    same = run_hf()[:, T0:].tolist() == run_ours()[0]
    t_hf, t_ours = timed(run_hf, cfg.repeats), timed(run_ours, cfg.repeats)
    tps_hf, tps_ours = B * n / t_hf, B * n / t_ours
    line = (f"{name:9s} batch {B:2d}: ours {tps_ours:8.1f} tok/s  transformers {tps_hf:8.1f} tok/s  "
            f"ratio {tps_ours / tps_hf:5.2f}x  same tokens: {same}")
    if name == "134m_b1":
        wb, bw = weight_bytes_per_token(ours), copy_bandwidth(dev)
        bound = bw / wb
        line += (f"\n{'':9s} weights read/token {wb / 1e6:.0f} MB, copy bandwidth {bw / 1e9:.1f} GB/s -> bound "
                 f"{bound:.1f} tok/s; ours = {tps_ours / bound:.0%} of bound, transformers = {tps_hf / bound:.0%}")
    print(line, flush=True)


def run_rm_case(name, cfg):
    """Forward + backward of the BT loss on one batch of pairs, ours against HF's sequence classifier."""
    from transformers import LlamaForSequenceClassification
    from rm import RewardModel, bt_loss
    dev = torch.device(cfg.device)
    trunk = Llama.from_pretrained(os.path.join(HERE, "data", "stories260K"), device=dev) if name == "rm_260k" \
        else make_134m(dev)
    trunk.lm_head = None
    torch.manual_seed(0)
    ours = RewardModel(trunk, Tokenizer(os.path.join(HERE, "data", "stories260K")), max_length=512).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = LlamaForSequenceClassification.from_pretrained(d, dtype=torch.float32).to(dev).train()
        pad = hf.config.pad_token_id
    n_pairs = 16 if name == "rm_260k" else 4
    g = torch.Generator().manual_seed(0)
    V = trunk.config.vocab_size
    seqs = [torch.randint(3, V, (int(torch.randint(20, 250, (1,), generator=g)),), generator=g).tolist() + [2]
            for _ in range(2 * n_pairs)]
    idx, mask = pad_batch(seqs, device=dev)                                   # left padded
    hf_idx = idx.masked_fill(~mask, pad)

    def step_ours():
        r = ours(idx, mask)
        bt_loss(r[:n_pairs], r[n_pairs:]).backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        r = hf(input_ids=hf_idx, attention_mask=mask.long()).logits[:, 0]
        bt_loss(r[:n_pairs], r[n_pairs:]).backward()
        hf.zero_grad(set_to_none=True)

    with torch.no_grad():
        same = (ours(idx, mask) - hf(input_ids=hf_idx, attention_mask=mask.long()).logits[:, 0]).abs().max().item()
    t_hf, t_ours = timed(step_hf, cfg.repeats), timed(step_ours, cfg.repeats)
    print(f"{name:9s} {n_pairs:2d} pairs: ours {n_pairs / t_ours:8.1f} pairs/s  transformers {n_pairs / t_hf:8.1f} "
          f"pairs/s  ratio {t_hf / t_ours:5.2f}x  max score diff {same:.1e}", flush=True)


# -----------------------------------------------------------------------------
# GPU cases: a 7B shape with random bf16 weights

def shape_config(name):
    import memory
    if name == "tiny":
        return LlamaConfig.from_dict({"model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
                                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                      "vocab_size": 512, "max_position_embeddings": 1024})
    return memory.model_config(name)


def random_model(cfg, dev, dtype, lm_head=True):
    with torch.device(dev):
        model = Llama(cfg, lm_head=lm_head).to(dtype)
    torch.manual_seed(0)
    return model.init_weights().eval()


def run_decode_7b(cfg):
    dev = torch.device(cfg.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    mc = shape_config(cfg.shape)
    model = random_model(mc, dev, dtype)
    prompts = [[1] + list(range(10, 17))]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t = timed(lambda: (generate(model, prompts, cfg.new_tokens, temperature=0, stop_ids=[]), sync()), cfg.repeats)
    tps = cfg.new_tokens / t
    wb, bw = weight_bytes_per_token(model), copy_bandwidth(dev, nbytes=2**30 if dev.type == "cuda" else 2**27)
    _, syncs = per_token(lambda n: generate(model, prompts, n, temperature=0, stop_ids=[]), 32)
    cuda_syncs = ""
    if dev.type == "cuda":   # CUDA's own count: every synchronizing call warns in this debug mode
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            generate(model, prompts, 64, temperature=0, stop_ids=[])
            torch.cuda.set_sync_debug_mode(0)
        cuda_syncs = f" ({sum('synchroniz' in str(w.message) for w in caught)} by CUDA's count in a 64-token call)"
    print(f"decode_7b {cfg.shape} {str(dtype).removeprefix('torch.')} batch 1: {tps:.1f} tok/s; weights read/token "
          f"{wb / 1e9:.2f} GB, copy bandwidth {bw / 1e9:.0f} GB/s -> bound {bw / wb:.1f} tok/s; "
          f"ours = {tps / (bw / wb):.0%} of bound; host syncs per token {syncs:.3f}{cuda_syncs}", flush=True)


GATHERS = """
import json, sys
import torch
from bench import DispatchCounter
from common import rank
from model import Llama
from sample import generate
from sft import Config
from trainer import end_distributed, prepare_for_training, setup_distributed
from bench import shape_config
setup_distributed("cpu")
torch.manual_seed(0)
model = Llama(shape_config("tiny")).init_weights()
prepare_for_training(model, Config(device="cpu", fsdp=True), torch.float32)
counts = {}
for n in (8, 64):
    with DispatchCounter() as c:
        generate(model, [[1, 20 + rank(), 30]], n, temperature=1.0, seed=[rank()], stop_ids=[])
    counts[n] = sum(v for k, v in c.collectives.items() if "gather" in k)
if rank() == 0:
    print(json.dumps(counts))
del model
end_distributed()
"""


def run_gathers(cfg):
    """FSDP's all-gathers in one rollout of 8 and of 64 tokens: 2 gloo processes on the CPU (one GPU cannot hold two
    NCCL processes), a tiny random model sharded over them."""
    import subprocess
    import sys
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "gathers.py")
        with open(script, "w") as f:
            f.write(GATHERS)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            script], capture_output=True, text=True, cwd=HERE, timeout=300,
                           env={**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise UserError(f"gathers: the 2-process run failed:\n{r.stderr[-2000:]}")
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"gathers (FSDP, 2 gloo processes): all-gathers per rollout of 8 tokens {counts['8']}, of 64 tokens "
          f"{counts['64']} (once per rollout: sample.gathered)", flush=True)


def save_random_checkpoints(cfg, d, dev):
    """A random policy (causal LM) and reward model of cfg's shape, with the bundled tokenizer, in d."""
    from rm import RewardModel
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = Tokenizer(os.path.join(HERE, "data", "stories260K"))
    policy = random_model(cfg, dev, dtype)
    policy.save_pretrained(os.path.join(d, "policy"), files=tok.files())
    del policy
    rm = RewardModel(random_model(cfg, dev, dtype, lm_head=False), tok, max_length=cfg.context)
    rm.save_pretrained(os.path.join(d, "rm"))
    del rm
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measured_against_plan(name, cfg, run, job):
    """Run `run()` and print the peak of allocated CUDA memory against memory.py's plan of `job`."""
    import memory
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    run()
    dt = time.perf_counter() - t0
    rows, peak, _ = memory.plan(shape_config(cfg.shape), job)
    planned = peak - (0.6 * memory.GiB if job.device == "cuda" else 0)   # allocated memory excludes the context
    if dev.type == "cuda":
        got = torch.cuda.max_memory_allocated(dev)
        print(f"{name} {cfg.shape}: peak allocated {got / memory.GiB:.2f} GiB, plan {planned / memory.GiB:.2f} GiB "
              f"(measured / plan = {got / planned:.2f}); {dt:.1f} s", flush=True)
    else:
        print(f"{name} {cfg.shape}: ran in {dt:.1f} s on the CPU; plan {planned / memory.GiB:.3f} GiB (peak memory is "
              f"measured on CUDA only)", flush=True)


def run_rm_step_7b(cfg, rows=16, seq=512):
    import memory
    import rm as rmlib
    dev = torch.device(cfg.device)
    mc = shape_config(cfg.shape)
    with tempfile.TemporaryDirectory() as d:
        save_random_checkpoints(mc, d, dev)
        words = " ".join(f"w{i}" for i in range(2 * seq))      # long enough to be cut to seq tokens
        with open(os.path.join(d, "pairs.jsonl"), "w") as f:
            for i in range(rows // 2 + 1):
                f.write(json.dumps({"prompt": f"q{i}", "chosen": words, "rejected": words[::-1]}) + "\n")
        tc = rmlib.TrainConfig(data=os.path.join(d, "pairs.jsonl"), model=os.path.join(d, "rm"), out=os.path.join(d, "o"),
                               max_length=seq, batch_size=rows // 2, micro_batch=rows // 2, val_frac=0.01, epochs=1.0,
                               device=cfg.device, lora_rank=16, grad_checkpointing=True)
        job = memory.Job(job="rm", dtype="bf16" if dev.type == "cuda" else "fp32", lora_rank=16,
                         grad_checkpointing=True, rows=rows, seq=seq, device=dev.type)
        measured_against_plan("rm_step_7b", cfg, lambda: rmlib.train(tc), job)


def run_ppo_step_7b(cfg, rollout_rows=16, minibatch=8, new_tokens=128):
    import memory
    import ppo as ppolib
    from readers import read_prompts
    dev = torch.device(cfg.device)
    mc = shape_config(cfg.shape)
    with tempfile.TemporaryDirectory() as d:
        save_random_checkpoints(mc, d, dev)
        prompts = os.path.join(d, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("\n".join(" ".join(f"w{i}" for i in range(40 + k)) for k in range(rollout_rows)))
        pc = ppolib.Config(policy=os.path.join(d, "policy"), rm=os.path.join(d, "rm"), prompts=prompts,
                           out=os.path.join(d, "o"), steps=1, batch_size=rollout_rows, minibatch=minibatch,
                           ppo_epochs=1, max_new_tokens=new_tokens, samples_per_log=0, device=cfg.device, lora_rank=16,
                           grad_checkpointing=True, penalize_missing_eos=False)
        tok = Tokenizer(os.path.join(d, "policy"))
        prompt = max(len(tok.encode(format_dialogue(p))) for p in read_prompts(prompts))
        job = memory.Job(job="ppo", dtype="bf16" if dev.type == "cuda" else "fp32", lora_rank=16,
                         grad_checkpointing=True, rows=minibatch, seq=prompt + new_tokens, response=new_tokens,
                         rollout_rows=rollout_rows, device=dev.type)
        measured_against_plan("ppo_step_7b", cfg, lambda: ppolib.train(pc), job)


GPU_CASES = {"decode_7b": run_decode_7b, "rm_step_7b": run_rm_step_7b, "ppo_step_7b": run_ppo_step_7b,
             "gathers": run_gathers}


def main(argv):
    cfg = parse_args(Config, argv)
    cfg.model, cfg.tokenizer = model_folder(cfg.model), model_folder(cfg.tokenizer, "--tokenizer", weights=False)
    names = cfg.cases.split(",")
    if all(n in GPU_CASES for n in names):   # these need no transformers
        print(f"torch {torch.__version__}, device {cfg.device}"
              + (f" ({torch.cuda.get_device_name(cfg.device)})" if cfg.device.startswith("cuda") else ""))
        for n in names:
            GPU_CASES[n](cfg)
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("bench.py compares against transformers: pip install -r requirements-test.txt") from None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {cfg.device}, "
          f"threads {torch.get_num_threads()}, {cfg.new_tokens} new tokens, median of {cfg.repeats}")
    for name in cfg.cases.split(","):
        if name in GPU_CASES:
            GPU_CASES[name](cfg)
            continue
        if name in ("tok_bpe", "stops", "stages", "novelty", "prefix"):
            {"tok_bpe": run_tokenizer_case, "stops": run_stops_case, "stages": run_stages_case,
             "novelty": run_novelty_case,
             "prefix": run_prefix_case}[name](cfg)
            continue
        if name not in ("260k_b1", "134m_b1", "260k_b16", "134m_b16", "rm_260k", "rm_134m"):
            raise UserError(f"--cases: unknown case {name!r}.")
        (run_rm_case if name.startswith("rm_") else run_case)(name, cfg)


if __name__ == "__main__":
    run_cli(main)
