import json
import os
import random
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
