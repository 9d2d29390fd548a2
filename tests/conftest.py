import os
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
