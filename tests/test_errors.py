"""Every mistake a user can make ends in one clear message naming the file and the fix."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, STORIES
from model import Llama, UserError, load


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the bundled model."""
    d = tmp_path / "m"
    shutil.copytree(STORIES, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def edit_config(d, **kw):
    cfg = json.load(open(d / "config.json"))
    cfg.update(kw)
    json.dump(cfg, open(d / "config.json", "w"))


def edit_tensors(d, fn):
    state = load_file(d / "model.safetensors")
    fn(state)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def check(d, *words):
    with pytest.raises(UserError) as e:
        load(str(d))
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_folder(tmp_path):
    check(tmp_path / "nope", "nope", "no such model folder")


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    check(ckpt, "config.json", "missing")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    check(ckpt, "config.json", "not valid JSON")


def test_config_not_llama(ckpt):
    edit_config(ckpt, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    check(ckpt, "config.json", "not a LLaMA", "gpt2")


def test_config_bad_heads(ckpt):
    edit_config(ckpt, num_key_value_heads=3)
    check(ckpt, "config.json", "num_key_value_heads=3")


def test_unsupported_rope_scaling(ckpt):
    edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    check(ckpt, "config.json", "yarn")


def test_missing_weights_file(ckpt):
    os.remove(ckpt / "model.safetensors")
    check(ckpt, "model.safetensors", "never pickles")


def test_corrupt_weights_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    check(ckpt, "model.safetensors", "not a readable safetensors")


def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda s: s.pop("model.layers.3.mlp.up_proj.weight"))
    check(ckpt, "model.layers.3.mlp.up_proj.weight", "lacks")


def test_extra_tensor(ckpt):
    edit_tensors(ckpt, lambda s: s.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2, 2)))
    check(ckpt, "model.safetensors", "unexpected tensor", "model.layers.9.mlp.up_proj.weight")


def test_wrong_shape(ckpt):
    edit_tensors(ckpt, lambda s: s.__setitem__("model.norm.weight", torch.ones(65)))
    check(ckpt, "model.norm.weight", "(65,)", "(64,)")


def test_weights_of_another_config(ckpt):
    edit_config(ckpt, hidden_size=128)
    check(ckpt, "shape", "config.json")


def test_missing_shard(tmp_path, stories):
    model, _ = stories
    model.save_pretrained(str(tmp_path / "s"), max_shard_bytes=100_000)
    index = json.load(open(tmp_path / "s" / "model.safetensors.index.json"))
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "s" / gone)
    with pytest.raises(UserError, match=gone):
        Llama.from_pretrained(str(tmp_path / "s"))


def test_missing_tokenizer(ckpt):
    os.remove(ckpt / "tokenizer.model")
    check(ckpt, "tokenizer.model", "missing")


def test_tokenizer_vocab_larger_than_model(ckpt):
    edit_config(ckpt, vocab_size=256)
    edit_tensors(ckpt, lambda s: s.__setitem__("model.embed_tokens.weight", s["model.embed_tokens.weight"][:256].clone()))
    check(ckpt, "tokenizer.model", "512 pieces", "vocab_size is 256")


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
        line = lines[f"--{f.name}"]
        assert repr(getattr(cfg(), f.name)) in line and helps[f.name] in line, line


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
    ("almost.py", ["--ppo_lr=nan"], ["--ppo_lr=nan"]),
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
