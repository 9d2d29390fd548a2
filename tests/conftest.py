import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STORIES = os.path.join(ROOT, "data", "stories260K")

torch.set_num_threads(min(2, torch.get_num_threads()))


try:   # the parity oracle, a test extra: the tests that need it skip one by one without it
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers, the parity oracle "
                                        "(pip install -r requirements-test.txt)")


@pytest.fixture(scope="session")
def stories():
    from model import load
    return load(STORIES)


def toy_pairs(n, seed=0):
    """A learnable preference: the chosen story is happy, the rejected one sad; names, things, templates vary."""
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Sue", "Max", "Ben", "Anna", "Tim", "Mia"]
    things = ["ball", "dog", "cat", "box", "tree", "car", "cake", "toy", "bird", "park"]
    good, bad = ["happy", "glad", "kind", "nice", "good", "proud"], ["sad", "angry", "mean", "bad", "scared", "upset"]
    templates = ["{n} saw the {t}. {n} was very {a}.", "The {t} made {n} feel {a}.", "{n} had a {t} and felt {a} all day."]
    out = []
    for _ in range(n):
        nm, th, tp = rng.choice(names), rng.choice(things), rng.choice(templates)
        out.append({"prompt": f"Tell me about {nm} and the {th}.", "chosen": tp.format(n=nm, t=th, a=rng.choice(good)),
                    "rejected": tp.format(n=nm, t=th, a=rng.choice(bad))})
    return out


def eos_prone_policy(dst):
    """stories260K whose EOS logit equals that of the word-start token '▁' (the tied embedding row copied), so that
    rollouts end at any step, the first included: about a third of them there."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(STORIES, dst)
    t = load_file(os.path.join(dst, "model.safetensors"))
    t["model.embed_tokens.weight"][2] = t["model.embed_tokens.weight"][410]
    save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


SHARED_SMOLLM2 = os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The folder of SmolLM2-135M-Instruct's tokenizer files (byte-level BPE); the test skips where it is absent."""
    if not os.path.isfile(os.path.join(SHARED_SMOLLM2, "tokenizer.json")):
        pytest.skip("SmolLM2's files are not beside the repository (../shared/models/smollm2-135m-instruct)")
    return SHARED_SMOLLM2


@pytest.fixture(scope="session")
def smollm2(smollm2_tokenizer):
    """SmolLM2-135M-Instruct as an HF folder, built once by its make_hf.py into .cache/ (needs gguf, a test
    extra; about 15 s)."""
    import shutil
    import subprocess
    out = os.path.join(ROOT, ".cache", "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        pytest.importorskip("gguf")
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, os.path.join(smollm2_tokenizer, "make_hf.py"), tmp], check=True,
                       capture_output=True, timeout=600)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


CHATML_TEMPLATE = ("{% for m in messages %}"
                   "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory):
    """A small tokenizer folder of the kind SmolLM2 ships (byte-level BPE, no BOS, ChatML chat template, EOS
    <|im_end|>), trained here on a few hundred sentences, for the tests that need a chat template and no model.
    Needs the tokenizers library (installed with transformers)."""
    tokenizers = pytest.importorskip("tokenizers", reason="building a BPE tokenizer needs the tokenizers library "
                                     "(pip install -r requirements-test.txt)")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("chatml")
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    texts = [v for p in toy_pairs(300) for v in p.values()] + ["Hi! Hello there. Bye. Goodbye! What is a cat?"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}))
    return str(d)


@pytest.fixture(scope="session")
def qwen2_stories(tmp_path_factory):
    """A tiny Qwen2 folder made here, with no download: the bundled story model's weights written as a Qwen2 checkpoint
    (model_type qwen2, Qwen2ForCausalLM, tied embeddings), with random biases on q, k and v (Qwen2's, which LLaMA has
    not), its vocabulary padded past the tokenizer's pieces as Qwen pads it, a context of 4,096 positions, and a ChatML
    chat template. It writes story-like text, so the pipeline's rules (the BAD filter, the comparisons) have answers
    to work on, where a random model's would all be dropped."""
    import shutil
    from safetensors.torch import load_file, save_file
    d = tmp_path_factory.mktemp("qwen2_stories")
    t = load_file(os.path.join(STORIES, "model.safetensors"))
    cfg = json.load(open(os.path.join(STORIES, "config.json")))
    C, V, pad = cfg["hidden_size"], cfg["vocab_size"], 64
    g = torch.Generator().manual_seed(0)
    t["model.embed_tokens.weight"] = torch.cat([t["model.embed_tokens.weight"], torch.zeros(pad, C)])
    t.pop("lm_head.weight", None)                                   # tied
    kv = cfg["num_key_value_heads"] * C // cfg["num_attention_heads"]
    for i in range(cfg["num_hidden_layers"]):
        for name, n in (("q_proj", C), ("k_proj", kv), ("v_proj", kv)):
            t[f"model.layers.{i}.self_attn.{name}.bias"] = torch.randn(n, generator=g) * 0.02
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    qwen = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "rms_norm_eps", "bos_token_id", "eos_token_id")}
    qwen.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=V + pad, hidden_act="silu",
                max_position_embeddings=4096, rope_theta=cfg.get("rope_theta", 10000.0), tie_word_embeddings=True,
                use_sliding_window=False, sliding_window=4096, max_window_layers=cfg["num_hidden_layers"],
                torch_dtype="float32")
    (d / "config.json").write_text(json.dumps(qwen))
    shutil.copy(os.path.join(STORIES, "tokenizer.model"), d / "tokenizer.model")
    tc = json.load(open(os.path.join(STORIES, "tokenizer_config.json")))
    (d / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": CHATML_TEMPLATE}))
    return str(d)


# -----------------------------------------------------------------------------
# helpers that several test files share

@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the bundled model."""
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def edit_config(d, **kw):
    """Set fields of the config.json in model folder d."""
    cfg = json.load(open(d / "config.json"))
    cfg.update(kw)
    json.dump(cfg, open(d / "config.json", "w"))


def small_cfg(**kw):
    """A small random LLaMA's config (2 layers, GQA, biases, untied), with fields overridden by kw."""
    from model import LlamaConfig
    d = dict(vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
             attention_bias=True)
    d.update(kw)
    return LlamaConfig.from_dict({"model_type": "llama", **d})


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves for backward while fn runs (parameters excluded)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def tiny(tmp_path, **kw):
    """The pipeline's resolved config on the story profile with tiny counts, out under tmp_path, fields set by kw."""
    from almost import Config, resolve
    cfg = Config(out=str(tmp_path / "out"), n_queries=6, n_rl_queries=4, batch_size=2, device="cpu",
                 rm_filter_ablation=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return resolve(cfg)


def interrupt_after(monkeypatch, n_calls):
    """Make the sampler fail on its (n_calls + 1)-th call, as a kill would."""
    import comparisons
    real, calls = comparisons.generate, [0]

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] > n_calls:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(comparisons, "generate", flaky)


def launch(script, args, n, tmp_path, timeout=300):
    """Run a script alone (n=1) or under torchrun with n gloo processes; fails the test on a nonzero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, script), *args] if n == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
         os.path.join(ROOT, script), *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:   # a hang: end torchrun's workers too, not only torchrun
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s (processes out of step?)")
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


FAMILIES = {   # name: (transformers' prefix, config fields)
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0, num_key_value_heads=2)),
    "qwen2_untied": ("Qwen2", dict(tie_word_embeddings=False, rope_theta=1000000.0, num_key_value_heads=1)),
    "mistral": ("Mistral", dict(sliding_window=4096, head_dim=24, rope_theta=1000000.0)),
}


def hf_family(name, seed=0, **kw):
    """A random transformers model of a FAMILIES entry, its biases and norms perturbed."""
    prefix, fields = FAMILIES[name]
    base = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, prefix + "Config")(**{**base, **fields, **kw})
    torch.manual_seed(seed)
    m = getattr(transformers, prefix + "ForCausalLM")(cfg).eval()
    with torch.no_grad():  # the biases HF zero-initialises, and the norms, perturbed so that they are tested
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def tiny_bpe_model(d, tokenizer_folder):
    """A random 1-layer LLaMA with a byte-level BPE tokenizer folder's files (and chat template), in folder d."""
    import shutil
    from model import Llama, LlamaConfig
    from tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_folder)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    Llama(cfg).init_weights().save_pretrained(str(d))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(tokenizer_folder, f)):
            shutil.copy(os.path.join(tokenizer_folder, f), d / f)
    return str(d)
