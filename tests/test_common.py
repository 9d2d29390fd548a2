"""common.py: a model flag's folder from the Hugging Face cache (offline), the files it needs, the message otherwise."""
import os
import shutil
import subprocess
import sys

import pytest

from common import UserError, cached_snapshot, model_folder
from conftest import ROOT, STORIES


def hub_layout(cache, repo_id, files_from=STORIES, commit="0123456789abcdef0123456789abcdef01234567"):
    """A model in the cache's layout, as huggingface_hub writes it: blobs, snapshots/<commit>/ of links, refs/main."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(snap)
    os.makedirs(os.path.join(repo, "refs"))
    for i, f in enumerate(sorted(os.listdir(files_from))):
        blob = os.path.join(repo, "blobs", f"{i:040x}")
        shutil.copy(os.path.join(files_from, f), blob)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, f))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snap


def test_a_hub_id_is_found_in_the_cache_offline(tmp_path, monkeypatch):
    """org/name -> the snapshot of its main revision, through huggingface_hub and through the layout alone; a local
    path always wins; an id not in the cache, or one cached without its weights, ends in one message."""
    cache = str(tmp_path / "hub")
    snap = hub_layout(cache, "karpathy/stories260K")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.path.samefile(model_folder("karpathy/stories260K"), snap)
    assert cached_snapshot("karpathy/stories260K") == snap
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)                 # not installed: the layout alone
    assert model_folder("karpathy/stories260K") == snap
    monkeypatch.delitem(sys.modules, "huggingface_hub")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "karpathy" / "stories260K").mkdir(parents=True)
    assert model_folder("karpathy/stories260K") == "karpathy/stories260K"    # a local path wins
    for module in (None, "real"):
        if module is None:
            monkeypatch.setitem(sys.modules, "huggingface_hub", None)
        with pytest.raises(UserError, match="not in the Hugging Face cache .*huggingface-cli download nobody/nothing"):
            model_folder("nobody/nothing")
        if module is None:
            monkeypatch.delitem(sys.modules, "huggingface_hub")
    os.remove(os.path.join(hub_layout(cache, "half/done"), "model.safetensors"))
    with pytest.raises(UserError, match="without model.safetensors"):
        model_folder("half/done")
    assert model_folder("half/done", weights=False)                           # memory.py needs the config alone


@pytest.mark.slow
def test_sample_py_runs_a_cached_hub_id_offline(tmp_path):
    """python sample.py --model=org/name with the model in a cache laid out in a temporary folder: it samples, and
    no network is asked for (HF_HUB_OFFLINE and no proxy would fail loudly); a missing id exits 2 with one line."""
    cache = str(tmp_path / "hub")
    hub_layout(cache, "karpathy/stories260K")
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9"}
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *a], capture_output=True,  # noqa
                                    text=True, cwd=tmp_path, env=env, timeout=120)
    r = run("--model=karpathy/stories260K", "--prompt=Once upon a time", "--max_new_tokens=20", "--num_samples=1")
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time") and len(r.stdout) > 30, r.stderr
    r = run("--model=nobody/nothing")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "huggingface-cli download nobody/nothing" in r.stderr
