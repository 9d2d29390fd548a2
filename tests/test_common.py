"""common.py: a model folder from the Hugging Face cache (offline), resumable records, seeds, the metrics log, the --out
folder's lock and checkpoint files, --help, and every CLI's bad input in one message."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from common import RecordWriter, UserError, cached_snapshot, model_folder, read_records
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


def test_records_resume_without_duplicates_or_losses(tmp_path):
    path = str(tmp_path / "out" / "responses.jsonl")
    with RecordWriter(path) as w:
        for i in range(3):
            w.write({"id": i})
    with open(path, "a") as f:                     # a kill in the middle of writing record 3
        f.write('{"id": 3, "resp')
    done = read_records(path)
    assert [r["id"] for r in done] == [0, 1, 2]
    with RecordWriter(path) as w:                  # the rerun writes what is missing
        for i in range(5):
            if i not in {r["id"] for r in done}:
                w.write({"id": i})
    assert [r["id"] for r in read_records(path)] == [0, 1, 2, 3, 4]
    assert read_records(str(tmp_path / "none.jsonl")) == []
    with open(path, "a") as f:
        f.write("not json\n")
        f.write('{"id": 5}\n')
    with pytest.raises(UserError, match=r"responses\.jsonl:6"):
        read_records(path)


def test_seed_derivation_and_metrics_log(tmp_path):
    from common import MetricsLog, derive_seed
    assert derive_seed(1337, "ppo_step", 7) == 1337 * 100003 + 7
    assert derive_seed(1337, "sampling", 3, 5) == ((1337 * 1_000_003 + 3) * 1_000_003 + 5) % 2**63
    assert derive_seed(1337, "sampling", 2**40, bits=31) == (1337 * 1_000_003 + 2**40) % 2**31
    log = MetricsLog(str(tmp_path), 0)
    for step in (1, 2, 3):
        log({"step": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4')                                           # a half-written line
    MetricsLog(str(tmp_path), 2)                                         # resuming from step 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]


# -----------------------------------------------------------------------------
# the folder lock: one run at a time in an --out folder, a dead run's lock taken over

def test_lock_file_states(tmp_path):
    """A lock being written (empty, fresh) counts as held; one left empty for long, one naming a dead or garbled pid
    on this host, or this very process, is stale; one from another host is held (it cannot be checked)."""
    import socket
    import time
    from common import lock_holder
    me, lock = {"pid": os.getpid(), "host": socket.gethostname()}, tmp_path / ".lock"
    lock.write_text("")
    assert lock_holder(str(lock), me)                                   # being written by another run
    os.utime(lock, (time.time() - 60, time.time() - 60))
    assert lock_holder(str(lock), me) is None                           # its writer died mid-write
    from common import process_state
    init_start = process_state(1)[1]
    for held, stale in [({"pid": 1, "host": me["host"]}, False), ({"pid": me["pid"], "host": me["host"]}, True),
                        ({"pid": "x", "host": me["host"]}, True), ({"pid": 1, "host": "elsewhere"}, False),
                        ({"pid": 1, "host": me["host"], "start": init_start}, False),
                        ({"pid": 1, "host": me["host"], "start": init_start + 1}, True)]:   # the pid given again since
        lock.write_text(json.dumps(held))
        assert (lock_holder(str(lock), me) is None) == stale, held


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    """While a process holds X/.lock (it says so once the lock is written, and keeps it until told to stop), `python
    rm.py --out=X` ends at once with a message naming it; the lock holds the pid and host and is gone when its holder
    ends. A lock left by a process that no longer exists is taken over, and a run releases it at its end."""
    import socket
    out = tmp_path / "rm"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from common import out_lock\n"
                               f"with out_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"               # the event: the lock is written and held
        lock = out / ".lock"
        from common import process_state
        assert json.loads(lock.read_text()) == {"pid": holder.pid, "host": socket.gethostname(),
                                                "start": process_state(holder.pid)[1]}
        r = cli_of("rm.py", "--preset=tiny", "--data=data/stories/comparisons.jsonl", f"--out={out}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"in use by another run (pid {holder.pid}" in r.stderr and ".lock" in r.stderr
        assert holder.poll() is None and lock.exists()                  # the holder and its lock are untouched
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0 and not lock.exists()                 # released at the end
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))   # a killed run's lock
    r = cli_of("rm.py", "--preset=tiny", "--data=data/stories/comparisons.jsonl", f"--out={out}", "--epochs=1",
               "--stop_after=2", "--device=cpu", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not lock.exists()


@pytest.mark.slow
def test_a_run_killed_with_sigkill_is_restarted_at_once(tmp_path):
    """A run killed with SIGKILL and restarted at once: the killed process is a zombie until its parent reaps it (here
    it is never reaped while the restart runs), which os.kill still finds; the restart sees a dead holder, takes the
    lock, runs, and releases it."""
    import signal
    out = tmp_path / "rm"
    for attempt in range(3):   # (three kills in a row: each restart must find its predecessor dead)
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common import out_lock\n"
                                   f"with out_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
        while open(f"/proc/{holder.pid}/stat").read().split(")")[1].split()[0] != "Z":
            time.sleep(0.01)                                            # killed, not reaped: a zombie
        r = cli_of("rm.py", "--preset=tiny", "--data=data/stories/comparisons.jsonl", f"--out={out}", "--epochs=1",
                   "--stop_after=1", "--device=cpu", "--resume=false", timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert holder.poll() is not None and not (out / ".lock").exists()


@pytest.mark.slow
def test_checkpoint_files_share_one_mode_and_a_stopped_bar_shows_its_steps(tmp_path):
    """Every file of a checkpoint folder is written with the same mode (safetensors alone would leave 0600 beside
    0644), and `--stop_after=2` ends with a progress bar at 2, not 1."""
    import stat
    r = cli_of("rm.py", "--preset=tiny", "--data=data/stories/comparisons.jsonl", f"--out={tmp_path}",
               "--stop_after=2", "--device=cpu", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "last").iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044, modes
    bar = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("rm:")][-1]
    assert " 2/" in bar, bar


# -----------------------------------------------------------------------------
# every script's flags: --help lists each with its default and a one-line description

CLIS = {"sample.py": "sample.Config", "rm.py": "rm.TrainConfig", "sft.py": "sft.Config", "ppo.py": "ppo.Config",
        "eval.py": "eval.Config", "almost.py": "almost.Config", "memory.py": "memory.Config", "bench.py": "bench.Config"}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(CLIS))
def test_help_describes_every_flag(script):
    import dataclasses
    import importlib
    from common import flag_help
    mod, cls = CLIS[script].split(".")
    cfg = getattr(importlib.import_module(mod), cls)
    helps = flag_help(cfg)
    r = cli_of(script, "--help")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = {line.split("=", 1)[0].strip(): line for line in r.stdout.splitlines() if line.startswith("  --")}
    for f in dataclasses.fields(cfg):
        assert helps.get(f.name), f"{script}: --{f.name} has no description (a trailing comment on its field)"
        if dataclasses.is_dataclass(f.type):   # a trainer's own config: its flags after its name and a dot
            line = lines[f"--{f.name}.FLAG"]
            assert helps[f.name] in line, line
            continue
        line = lines[f"--{f.name}"]
        assert repr(getattr(cfg(), f.name)) in line and helps[f.name] in line, line


# -----------------------------------------------------------------------------
# every CLI against a table of bad inputs: one message, exit status 2, no traceback

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files a user might hand over by mistake, and a saved reward model (a random head) for the cases that need
    one to get past the reward-model check."""
    from rm import RewardModel
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "ok", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9"}\n')
    (d / "latin1.txt").write_bytes(b"Once upon a time\nthere was a caf\xe9\n")
    (d / "seeds.txt").write_bytes(b"An instruction line\nWhat is a cat?\nWhy is the sky \xff blue?\n")
    (d / "pairs.parquet").write_bytes(b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00PAR1")
    (d / "binary.jsonl").write_bytes(b'{"a": 1}\n\x00\x01\x02\x03\n')
    (d / "a_file").write_text("not a folder")
    RewardModel.from_pretrained(STORIES).save_pretrained(str(d / "rm"))
    (d / "prompts.jsonl").write_text('{"query": "Once upon a time"}\n')
    return d


def cli_of(script, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


BAD = [  # (script, args, words in the message); {d} is the fixture's folder
    ("sample.py", ["--temperature=nan"], ["--temperature=nan", "not a finite number"]),
    ("sample.py", ["--temperature=inf"], ["--temperature=inf", "not a finite number"]),
    ("sample.py", ["--top_p=0"], ["--top_p=0.0"]),
    ("sample.py", ["--top_k=-1"], ["--top_k=-1"]),
    ("sample.py", ["--prompt_file={d}/latin1.txt"], ["latin1.txt:2", "not UTF-8"]),
    ("sample.py", ["--prompt_file={d}"], ["a folder"]),
    ("rm.py", ["--lr=nan", "--preset=tiny", "--data=x"], ["--lr=nan", "not a finite number"]),
    ("rm.py", ["--preset=tiny", "--data={d}/latin1.jsonl", "--out={d}/o1"], ["latin1.jsonl:2", "not UTF-8"]),
    ("rm.py", ["--preset=tiny", "--data={d}/pairs.parquet", "--out={d}/o2"], ["pairs.parquet", "Parquet"]),
    ("rm.py", ["--preset=tiny", "--data={d}/binary.jsonl", "--out={d}/o3"], ["binary.jsonl", "binary"]),
    ("rm.py", ["--preset=tiny", "--data=data/stories/comparisons.jsonl", "--out={d}/a_file"], ["a_file", "a file is in the way"]),
    ("rm.py", ["--preset=tiny", "--data=data/stories/comparisons.jsonl", "--out=/sys/almost_out"], ["/sys/almost_out", "cannot create"]),
    ("sft.py", ["--data={d}/latin1.jsonl", f"--model={STORIES}", "--out={d}/o4"], ["latin1.jsonl:2", "not UTF-8"]),
    ("sft.py", ["--data={d}/latin1.jsonl", f"--model={STORIES}", "--out={d}/a_file"], ["a file is in the way"]),
    ("ppo.py", [f"--policy={STORIES}", f"--rm={STORIES}", "--prompts={d}/prompts.jsonl"],
     [f"--rm={STORIES}", "not a reward model", "LlamaForCausalLM", "score.weight"]),
    ("ppo.py", [f"--policy={STORIES}", "--rm={d}/rm", "--prompts={d}/latin1.jsonl", "--out={d}/o5"], ["latin1.jsonl:2"]),
    ("ppo.py", [f"--policy={STORIES}", "--rm={d}/rm", "--prompts={d}/prompts.jsonl", "--kl_target=inf"], ["--kl_target=inf"]),
    ("ppo.py", [f"--policy={STORIES}", "--rm={d}/rm", "--prompts={d}/prompts.jsonl", "--out={d}/a_file"], ["a file is in the way"]),
    ("eval.py", [f"--rm={STORIES}"], ["not a reward model", "python rm.py"]),
    ("eval.py", ["--rm={d}/rm", "--data={d}/latin1.jsonl", "--out={d}/o6"], ["latin1.jsonl:2"]),
    ("eval.py", ["--rm={d}/rm", "--out={d}/a_file"], ["a file is in the way"]),
    ("almost.py", ["--seeds={d}/seeds.txt", "--out={d}/o7", "--stages=queries"], ["seeds.txt:3", "not UTF-8"]),
    ("almost.py", ["--out={d}/a_file", "--stages=report"], ["a file is in the way"]),
    ("almost.py", ["--reward_model=" + STORIES, "--out={d}/o8", "--stages=selfplay"], ["--reward_model=", "not a reward model"]),
    ("almost.py", ["--ppo.lr=nan"], ["--ppo.lr=nan"]),
    ("almost.py", ["--ppo_steps=3"], ["--ppo_steps", "--ppo.steps"]),
    ("almost.py", ["--reward_model=/nonexistent/rm", "--out={d}/o9", "--stages=selfplay"],
     ["--reward_model=/nonexistent/rm", "not a model folder", "out/rm/last"]),
    ("almost.py", ["--dry_run=true", "--out={d}/o10", "--stages=ppo,report", "--query_line=second"], ["--query_line"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,words", BAD, ids=[f"{s}:{' '.join(a)[:40]}" for s, a, _ in BAD])
def test_every_cli_refuses_bad_input_in_one_message(bad_inputs, script, args, words):
    r = cli_of(script, *[a.replace("{d}", str(bad_inputs)) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-2000:]
    for w in words:
        assert w.replace("{d}", str(bad_inputs)) in last, last
