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
