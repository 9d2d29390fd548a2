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
"""
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from model import Llama, LlamaConfig
from sample import UserError, generate, parse_args, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    cases: str = "260k_b1,134m_b1,260k_b16,134m_b16,rm_260k,rm_134m"
    new_tokens: int = 128
    repeats: int = 3
    device: str = "cpu"


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
    import torch.nn.functional as F
    from transformers import LlamaForSequenceClassification
    from model import Tokenizer
    from rm import RewardModel, pad_batch
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
        F.softplus(r[n_pairs:] - r[:n_pairs]).mean().backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        r = hf(input_ids=hf_idx, attention_mask=mask.long()).logits[:, 0]
        F.softplus(r[n_pairs:] - r[:n_pairs]).mean().backward()
        hf.zero_grad(set_to_none=True)

    with torch.no_grad():
        same = (ours(idx, mask) - hf(input_ids=hf_idx, attention_mask=mask.long()).logits[:, 0]).abs().max().item()
    t_hf, t_ours = timed(step_hf, cfg.repeats), timed(step_ours, cfg.repeats)
    print(f"{name:9s} {n_pairs:2d} pairs: ours {n_pairs / t_ours:8.1f} pairs/s  transformers {n_pairs / t_hf:8.1f} "
          f"pairs/s  ratio {t_hf / t_ours:5.2f}x  max score diff {same:.1e}", flush=True)


def main(argv):
    cfg = parse_args(Config, argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("bench.py compares against transformers: pip install -r requirements-test.txt") from None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {cfg.device}, "
          f"threads {torch.get_num_threads()}, {cfg.new_tokens} new tokens, median of {cfg.repeats}")
    for name in cfg.cases.split(","):
        if name not in ("260k_b1", "134m_b1", "260k_b16", "134m_b16", "rm_260k", "rm_134m"):
            raise UserError(f"--cases: unknown case {name!r}.")
        (run_rm_case if name.startswith("rm_") else run_case)(name, cfg)


if __name__ == "__main__":
    run_cli(main)
