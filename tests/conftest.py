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
