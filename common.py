"""
The plumbing every script shares, so that the other files hold only the method: command-line flags, the
one kind of error a user can fix, files (JSON, jsonl records, atomic writes and folders), seeds, and printing and
metrics from the master process only.

    cfg = parse_args(Config, sys.argv[1:])   # --key=value flags onto a dataclass; --help lists them with comments
    run_cli(main)                            # a UserError ends in one line on stderr and exit status 2
"""
import atexit
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import socket
import sys
import time

import torch


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad data). CLIs print it without a traceback."""


# -----------------------------------------------------------------------------
# command-line flags: a dataclass per script, one field a flag, its trailing comment the --help text

def flag_help(cls):
    """{field: its trailing comment} read from the source of the dataclass and its bases."""
    out = {}
    for c in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(c):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s*(.*)$", inspect.getsource(c), re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def print_help(cls):
    cfg, helps = cls(), flag_help(cls)
    print(f"usage: python {os.path.basename(sys.argv[0])} [--flag=value ...]\n\nflags (default, what it does):")
    for f in dataclasses.fields(cls):
        shown = f"  --{f.name}.FLAG=..." if dataclasses.is_dataclass(f.type) else f"  --{f.name}={getattr(cfg, f.name)!r}"
        print(shown.ljust(34) + " " + helps.get(f.name, ""))


def parse_args(cls, argv):
    """--key=value (or --key value) flags onto the dataclass `cls`, type-checked. A field that is itself a dataclass
    (the pipeline's trainer configs) takes its fields as --field.key=value. Unknown flags are errors; a flag of
    another spelling (cls.RENAMED) names this one."""
    cfg = cls()
    cfg._given = set()      # the flags given ("key", "field.key"), which a profile never replaces (user_set)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print_help(cls)
            sys.exit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: flags look like --key=value (--help lists them).")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"flag --{key} needs a value: --{key}=VALUE.")
            val, i = argv[i + 1], i + 1
        head, dot, name = key.partition(".")
        target = getattr(cfg, head, None) if dot else cfg
        types = {f.name: f.type for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
        if not dot and dataclasses.is_dataclass(types.get(key)):
            raise UserError(f"--{key}={val}: give its flags one by one, --{key}.FLAG=VALUE (python {key}.py --help).")
        if (name if dot else key) not in types:
            renamed = getattr(cls, "RENAMED", {}).get(key)
            if renamed:
                raise UserError(f"--{key}: spelled {renamed} here.")
            known = ", ".join(f"--{head}." + k for k in types) if dot and types else \
                ", ".join("--" + f.name + (".FLAG" if dataclasses.is_dataclass(f.type) else "")
                          for f in dataclasses.fields(cls))
            raise UserError(f"unknown flag --{key}. Known flags: {known}")
        name = name if dot else key
        typ = types[name]
        try:
            if typ is bool:
                if val.lower() not in ("1", "0", "true", "false"):
                    raise ValueError
                setattr(target, name, val.lower() in ("1", "true"))
            else:
                setattr(target, name, typ(val))
        except ValueError:
            raise UserError(f"--{key}={val!r}: expected a {typ.__name__}.") from None
        if typ is float and not math.isfinite(getattr(target, name)):
            raise UserError(f"--{key}={val}: not a finite number. Give a number such as "
                            f"--{key}={getattr(type(target)(), name)}.")
        cfg._given.add(key)
        i += 1
    return cfg


def user_set(cfg, key, flag=None, parsed=None):
    """Whether the user set field `key` of cfg, so that a profile or a preset must not replace it: for a config
    parse_args made (`parsed`, when cfg is one of its nested configs, `flag` its spelling there: "rm.lr"), whether the
    flag was given on the command line (whatever its value, the default's too); for a config built in code, whether
    the field differs from its default."""
    given = getattr(parsed if parsed is not None else cfg, "_given", None)
    if given is not None:
        return (flag or key) in given
    return getattr(cfg, key) != getattr(type(cfg)(), key)


def run_cli(main):
    """Run main(sys.argv[1:]) as a script: a UserError ends in one line on stderr and exit status 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# model folders: a local path, or a Hugging Face hub id found in the local cache. Nothing is ever downloaded.

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # "org/name"


def hub_cache():
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (XDG_CACHE_HOME in
    place of ~/.cache when set), as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")


def cached_snapshot(repo_id, cache=None):
    """The cache's folder for a hub id's main revision, read from the cache's layout: models--org--name/refs/main
    holds the commit, snapshots/<commit>/ the files. None when it is not there."""
    repo = os.path.join(cache or hub_cache(), "models--" + repo_id.replace("/", "--"))
    try:
        commit = open(os.path.join(repo, "refs", "main"), encoding="utf-8").read().strip()
    except OSError:
        return None
    folder = os.path.join(repo, "snapshots", commit)
    return folder if os.path.isdir(folder) else None


def model_folder(path, flag="--model", weights=True):
    """A model flag's folder: the path itself when it exists (a local path always wins); else a hub id ("org/name")
    resolved offline from the Hugging Face cache to the snapshot of its main revision, through huggingface_hub when
    it is installed, else from the cache's layout (cached_snapshot); the files the loader needs are checked there
    (config.json, and with weights the safetensors and a tokenizer). An id not in the cache ends in one message that
    says how to download it."""
    if not path or os.path.exists(path) or not HUB_ID.match(path):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        try:
            folder = snapshot_download(path, cache_dir=hub_cache(), local_files_only=True)
        except LocalEntryNotFoundError:
            folder = None
    except ImportError:
        folder = cached_snapshot(path)
    if folder is None:
        raise UserError(f"{flag}={path}: no such folder, and not in the Hugging Face cache ({hub_cache()}). Download "
                        f"it first (huggingface-cli download {path}) or pass its folder: nothing is downloaded here.")
    need = [("config.json",)] + ([("model.safetensors", "model.safetensors.index.json"),
                                  ("tokenizer.json", "tokenizer.model")] if weights else [])
    for names in need:
        if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
            raise UserError(f"{flag}={path}: the Hugging Face cache holds it ({folder}) without {' or '.join(names)}. "
                            f"Download the rest (huggingface-cli download {path}); only safetensors weights load.")
    return folder


# -----------------------------------------------------------------------------
# files. Whatever a stage produces is written to a temporary name and renamed, so a crash never leaves half a file;
# jsonl records are appended one flushed line at a time, so a kill loses at most the record being written.

def decode_text(data, path):
    """A file's bytes -> str. Parquet, binary and non-UTF-8 files end in one message that names the file (and the
    line of a bad byte)."""
    if data[:4] == b"PAR1":
        raise UserError(f"{path}: a Parquet file. Convert it to jsonl first, e.g. python -c \"import pandas; "
                        f"pandas.read_parquet('{path}').to_json('data.jsonl', orient='records', lines=True)\".")
    if b"\x00" in data:
        raise UserError(f"{path}: a binary file, not text. Give a UTF-8 text file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = data[:e.start].count(b"\n") + 1, e.start - data.rfind(b"\n", 0, e.start) - 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {col} of the line). Save the file as "
                        f"UTF-8.") from None


def read_text(path, what="file"):
    """THE text reader: a UTF-8 file's contents; a missing file or a folder is one clear message."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such {what}." if not os.path.isdir(path) else f"{path}: a folder, not a {what}.")
    with open(path, "rb") as f:
        return decode_text(f.read(), path)


def read_json(path):
    try:
        return json.loads(read_text(path, "JSON file"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}). Restore or delete the file.") from None


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    """THE JSON writer: indented, atomic."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path, records):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_records(path):
    """The complete records of a jsonl file ([] if it does not exist). A last line without its newline is what a
    kill mid-write leaves: it is cut off the file (the rerun writes that record again). A malformed line
    elsewhere is an error that names file:line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):                                   # a half-written last record
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for lineno, line in enumerate(decode_text(data[:end], path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not a JSON record ({e}). Fix or delete that line, then rerun: "
                            f"the stage redoes what is missing.") from None
    return records


class RecordWriter:
    """Appends records to a jsonl file, one line each, flushed at once."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record):
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tmp_dir(path):
    """A fresh folder beside `path` to write a checkpoint into before commit_dir swaps it in."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp, path):
    """Swap a finished temporary folder in place of `path`, keeping files of `path` that tmp does not have
    (a chat template, say), but not old weights or optimizer moments (a run's final checkpoint has none). The old
    folder is moved aside first, so `path` is never half written."""
    path = os.path.abspath(path)
    umask = os.umask(0)
    os.umask(umask)
    for f in os.listdir(tmp):                  # safetensors writes 0600; every file of a checkpoint reads alike
        if os.path.isfile(os.path.join(tmp, f)):
            os.chmod(os.path.join(tmp, f), 0o666 & ~umask)
    if os.path.isdir(path):
        stale = ("model.safetensors", "model.safetensors.index.json", "optimizer.safetensors")
        for f in os.listdir(path):
            src = os.path.join(path, f)
            if (not os.path.exists(os.path.join(tmp, f)) and not f.startswith(stale)
                    and not (f.startswith("model-") and f.endswith(".safetensors"))):
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, f))
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# -----------------------------------------------------------------------------
# seeds: every random stream of a run is seeded from --seed, a stream constant and the stream's keys, so a rerun or
# a resumed run draws the same numbers

STREAMS = {"queries": 7919, "rl_queries": 7927, "epoch": 1000, "ppo_step": 100003, "sampling": 1_000_003, "dpo_answers": 7933}


def derive_seed(seed, stream, *keys, bits=63):
    """THE seed derivation: fold the keys into --seed, s <- s * STREAMS[stream] + key, modulo 2**bits."""
    s = seed
    for k in keys:
        s = s * STREAMS[stream] + k
    return s % 2**bits


# -----------------------------------------------------------------------------
# one run per output folder

HELD = {}   # output folders this process has claimed -> their lock file


@contextlib.contextmanager
def out_lock(path, flag="--out"):
    """`with out_lock(cfg.out):` around a script's run, before any model loads: makes the output folder (a file in
    its place, or a place this process cannot write, is one clear message) and takes its lock, out/.lock, holding
    this process's pid and host. A second run into the same folder ends with a message naming the first; a lock
    left by a run that was killed (its pid is gone from this host) is taken over. Under torchrun only process 0
    (RANK) takes it. Released when the block ends (or, at the latest, when the process exits)."""
    mine = claim_out(path, flag)
    try:
        yield
    finally:
        if mine:
            release_out(mine)


def claim_out(path, flag):
    """out_lock's work: the folder checked and made, the lock taken. Returns the lock file, or None when this
    process holds it already or is not process 0."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}={path}: a file is in the way. Give a folder (it is created if missing).")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}={path}: cannot create this folder ({e.strerror}). Give one you can write to.") \
            from None
    if os.path.abspath(path) in HELD or int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = os.path.join(path, ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": (process_state(os.getpid()) or (None, None))[1]}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = lock_holder(lock, me)
            if other:
                raise UserError(f"{flag}={path} is in use by another run (pid {other.get('pid')} on "
                                f"{other.get('host')}, {lock}). Wait for it to end, or give another {flag}. If no "
                                f"such run is alive, delete {lock}.")
            os.remove(lock)                                           # stale: taken over
            continue
        except OSError as e:
            raise UserError(f"{flag}={path}: cannot write in this folder ({e.strerror}). Give one you can write to.") \
                from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        HELD[os.path.abspath(path)] = lock
        return lock
    raise UserError(f"{flag}={path}: another run took {lock} at the same moment. Give another {flag}.")


def lock_holder(lock, me):
    """The live run that holds a lock file ({"pid", "host", "start"}), or None when the lock is stale: its process
    is gone from this host (pid_alive), or its pid is this very process's (a lock that outlived a restart), or the file
    is empty and older than 5 seconds (its writer died between creating and writing it)."""
    try:
        other = json.loads(open(lock, encoding="utf-8").read())
    except (OSError, ValueError):
        try:
            young = time.time() - os.path.getmtime(lock) < 5
        except OSError:
            young = False
        return {"pid": "?", "host": "?"} if young else None
    if not isinstance(other, dict):
        return None
    pid = other.get("pid")
    if other.get("host") == me["host"] and (not isinstance(pid, int) or pid == me["pid"] or
                                            not pid_alive(pid, other.get("start"))):
        return None
    return other


def process_state(pid):
    """(state letter, start time in clock ticks since boot) of a process, from /proc; None where /proc has no entry
    for it (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()                    # after "pid (comm) ": state is the first field
    return fields[0], int(fields[19])                                  # starttime: field 22 of the line


def pid_alive(pid, start=None):
    """Whether the process that took a lock is still running here. Dead: no such process; a zombie (killed, not yet
    reaped by its parent, which os.kill still finds); or a process that has since been given the same pid (its start
    time is not the one the lock recorded)."""
    state = process_state(pid)
    if state is not None:
        return state[0] not in ("Z", "X") and (start is None or state[1] == start)
    if os.path.isdir("/proc/self"):                                     # Linux: no entry, no process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                           # alive, another user's
        return True
    return True


@atexit.register
def release_out(lock=None):
    """Remove a lock of this process (every one it holds when lock is None)."""
    for key, held in list(HELD.items()):
        if lock in (None, held):
            try:
                if json.loads(open(held, encoding="utf-8").read()).get("pid") == os.getpid():
                    os.remove(held)
            except (OSError, ValueError):
                pass
            del HELD[key]


# -----------------------------------------------------------------------------
# processes: under torchrun only the master process (rank 0) prints, logs and writes

def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class MetricsLog:
    """A run's metrics.jsonl: one JSON line per record, appended by the master process. A run that resumes from its
    checkpoint at `step` repeats the steps after it, so their lines (and a half-written last line) are dropped first:
    no step is logged twice."""

    def __init__(self, out, step=0):
        self.path = os.path.join(out, "metrics.jsonl")
        if rank() != 0:
            return
        os.makedirs(out, exist_ok=True)
        if os.path.isfile(self.path):
            keep = []
            for line in open(self.path, encoding="utf-8"):
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    pass
            write_text(self.path, "".join(keep))

    def __call__(self, record):
        if rank() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
