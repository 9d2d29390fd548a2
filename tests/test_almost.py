"""almost.py, the pipeline: its flags and profiles, the stages' wiring, the CLI, dry runs, torchrun, and whole runs
(tiny, killed and restarted, the same under one seed, the paper's and the chat profile on a small scale)."""
import json
import os
import subprocess
import sys

import pytest

import almost
import comparisons
from almost import Config, resolve
from common import read_json, read_records
from conftest import ROOT, tiny


# -----------------------------------------------------------------------------
# whole runs, the CLI and dry runs

@pytest.mark.slow
def test_whole_pipeline_tiny(tmp_path):
    """All stages with tiny counts, through the CLI, as `python almost.py` runs them."""
    import subprocess
    import sys
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), f"--out={out}", "--n_queries=12", "--device=cpu",
                        "--n_rl_queries=8", "--rm_filter_ablation=false", "--ppo.steps=2", "--eval_max_items=8"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ["queries.jsonl", "responses.jsonl", "comparisons.jsonl", "comparisons_nofilter.jsonl",
              "compare_stats.json", "check_stats.json", "rm_stats.json", "timings.json", "rm/last/config.json"]:
        assert (out / f).exists(), f
    stats = json.load(open(out / "compare_stats.json"))
    pairs = read_records(str(out / "comparisons.jsonl"))
    assert stats["pairs"] == len(pairs) > 0 and stats["pairs_without_length_rule"] >= len(pairs)
    assert all(set(p) == {"prompt", "chosen", "rejected", "meta"} for p in pairs)
    assert set(json.load(open(out / "timings.json"))) == {"queries", "responses", "compare", "check", "rm",
                                                            "selfplay", "sft", "ppo", "dpo", "eval", "report"}
    ev = json.load(open(out / "eval" / "results.json"))
    assert ev["protocol"] == "authors" and ev["rm"] == {}      # the rm stage scores the reward models
    assert list(ev["models"]) == ["base", "sft", "ppo", "dpo"] and set(ev["vicuna"]) == {"base", "ppo", "dpo"}
    assert (out / "dpo" / "last" / "config.json").exists() and read_records(str(out / "dpo_pairs.jsonl"))
    assert all(sum(v["rm"][k] for k in ("win", "tie", "loss")) == 8 for v in ev["vicuna"].values())
    assert all(m["static_hhh"]["all"]["n"] == 8 and m["truthfulqa_mc1"]["n"] == 8 for m in ev["models"].values())
    assert (out / "eval" / "vicuna" / "ppo.jsonl").exists()
    report = open(out / "report.md").read()
    assert "| comparisons" in report and "## Evaluation" in report and "PPO: RM score" in report
    assert "## Did it work?" in report and "prefer the longer answer" in report and "distinct-2" in report
    assert "Caveat: this judge is the reward model PPO optimised" in report and "## Samples" in report
    for f in ("report_rm.svg", "report_ppo_rm_score_mean.svg", "report_ppo_kl.svg"):
        assert f"]({f})" in report and (out / f).read_text().startswith("<svg")
    assert "| figure | value |" in r.stdout
    assert len(read_records(str(out / "ppo" / "metrics.jsonl"))) == 2 and (out / "ppo" / "last" / "policy").is_dir()
    for f in ["selfplay_n4.jsonl", "selfplay_n1.jsonl", "selfplay_stats.json", "sft/best/config.json",
              "sft_plain/best/config.json", "sft_stats.json"]:
        assert (out / f).exists(), f
    sft = json.load(open(out / "sft_stats.json"))
    assert set(sft) == {"sft", "sft_plain", "base"} and all("mean_rm_score" in v for v in sft.values())
    rm_stats = json.load(open(out / "rm_stats.json"))
    for s in ("static_hhh", "hh_harmless", "hh_helpful"):   # capped like every evaluation set, at 8 items
        assert 0 <= rm_stats["filter"][s]["accuracy"] <= 1 and rm_stats["filter"][s]["n"] == 8
    # rerunning skips the finished work
    r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), f"--out={out}", "--n_queries=12",
                        "--n_rl_queries=8", "--rm_filter_ablation=false", "--stages=queries,responses"], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "already in" in r.stdout and "skipping" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["--stages=queries,bogus"], ["unknown stage 'bogus'"]),
    (["--profile=paper", "--stages=responses"], ["--generators is required"]),
    (["--profile=paper", "--stages=selfplay"], ["--assistant is required"]),
    (["--profile=gpt"], ["--profile='gpt'"]),
    (["--profile=chat"], ["--profile=chat needs --model"]),
    (["--queries_per_prompt=-2", "--stages=queries"], ["--queries_per_prompt=-2", "use 1"]),
    (["--profile=chat", "--model=/nonexistent/smollm2"], ["--model=/nonexistent/smollm2", "no config.json"]),
    (["--generators=a=/m:/p", "--stages=compare"], ["NAME=MODEL:PROMPT_FILE:SHOTS"]),
    (["--rubric=260K-good-2shot>nope", "--stages=compare"], ["'nope' is not one of the generators"]),
])
def test_cli_errors(tmp_path, args, words):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), f"--out={tmp_path}", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


@pytest.mark.slow
def test_paper_profile_dialogue_path_runs(tmp_path):
    """The paper's dialogue format end to end, with the bundled models standing in for LLaMA folders (0-shot:
    the HHH dialogues do not fit a 512-token context; the quality of the text is beside the point)."""
    import subprocess
    import sys
    from comparisons import bad_query_length
    d = os.path.join(ROOT, "data")
    gens = (f"a={d}/stories260K:{d}/almost/HHH_prompt.txt:0:48,"
            f"b={d}/stories50K:{d}/almost/HHH_prompt.txt:0:48")
    seeds = tmp_path / "seeds.txt"   # the paper's 100 seeds are too long for ten of them in 512 tokens
    seeds.write_text("### Instruction: Please generate initial query to start conversation with bot.\n" + "\n".join(
        ["How do I bake bread?", "What is a cat?", "Why is the sky blue?", "Where do birds sleep?",
         "Can you help me cook rice?", "How old is the moon?", "What do dogs eat?", "Is tea good for me?",
         "How do trees grow?", "Why do we dream?", "What is rain?", "How do I tie a shoe?"]) + "\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), "--profile=paper", f"--out={tmp_path}", "--device=cpu",
                        "--n_queries=4", "--n_rl_queries=4", "--query_line=first", f"--seeds={seeds}", f"--query_model={d}/stories260K", f"--rm.model={d}/stories260K",
                        f"--generators={gens}", "--rubric=a>b", "--stages=queries,responses,compare,check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    qs = read_records(str(tmp_path / "queries.jsonl"))
    assert len(qs) == 4 and all(not bad_query_length(q["query"]) and "query:" not in q["query"].lower() for q in qs)
    rs = read_records(str(tmp_path / "responses.jsonl"))
    assert sorted((r["query_id"], r["config"]) for r in rs) == [(i, c) for i in range(4) for c in "ab"]
    assert all("Human:" not in r["response"] and "Assistant:" not in r["response"] for r in rs)
    assert json.load(open(tmp_path / "compare_stats.json"))["responses"] == 8


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_does_nothing(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), f"--out={out}", "--dry_run=true"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    for s in ["queries", "responses", "compare", "check", "rm", "selfplay", "sft", "ppo", "eval", "report"]:
        assert f"  {s} " in r.stdout
    assert "tokens to generate in all" in r.stdout and not out.exists()


@pytest.mark.slow
def test_killed_run_restarts_cleanly(tmp_path):
    """SIGKILL `python almost.py` inside four stages, then run it to the end: every record once, none missing, and the
    checkpoints load. A half-written checkpoint folder left by a kill is never read."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    args = [sys.executable, os.path.join(ROOT, "almost.py"), f"--out={out}", "--n_queries=12", "--n_rl_queries=8", "--device=cpu",
            "--rm_filter_ablation=false", "--ppo.steps=3", "--eval_max_items=4", "--stages=queries,responses,compare,rm,selfplay,sft,ppo"]
    # each run is killed when a stage's output shows it is in the middle of its work (events, not clocks), each
    # run later in the pipeline than the one before: inside queries, responses, the rm's training, self-play
    for name, n in (("queries.jsonl", 4), ("responses.jsonl", 10), ("rm/metrics.jsonl", 1), ("selfplay_n4.jsonl", 1)):
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path, deadline = out / name, time.time() + 300
        while not (path.exists() and path.read_bytes().count(b"\n") >= n):
            assert p.poll() is None, f"the run ended before {name} had {n} records"
            assert time.time() < deadline, f"{name} never reached {n} records"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
    (out / "rm").mkdir(parents=True, exist_ok=True)
    (out / "rm" / "last.tmp").mkdir(exist_ok=True)                # what a kill inside save_pretrained leaves
    (out / "rm" / "last.tmp" / "config.json").write_text("{ half written")
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    qs = read_records(str(out / "queries.jsonl"))
    assert [q["id"] for q in qs] == list(range(12))
    keys = [(x["query_id"], x["config"]) for x in read_records(str(out / "responses.jsonl"))]
    assert len(keys) == len(set(keys)) == 4 * 12
    for n in (4, 1):
        ids = [x["query_id"] for x in read_records(str(out / f"selfplay_n{n}.jsonl"))]
        assert sorted(ids) == list(range(11))
    from model import Llama
    from rm import RewardModel
    RewardModel.from_pretrained(str(out / "rm" / "best"))
    Llama.from_pretrained(str(out / "sft" / "best"))
    Llama.from_pretrained(str(out / "ppo" / "last" / "policy"))
    assert [x["step"] for x in read_records(str(out / "ppo" / "metrics.jsonl"))] == [1, 2, 3]


@pytest.mark.slow
def test_chat_profile_runs_end_to_end_small(smollm2, tmp_path):
    """--profile=chat on SmolLM2, made small (few queries, short answers, one short PPO step, a few evaluation items):
    every stage runs in the dialogue format and leaves its files; the check stage judges each rubric pair; the reward
    models are scored on static HHH and both HH test splits; the report gives a verdict per step."""
    d, m = os.path.join(ROOT, "data", "almost"), smollm2
    gens = ",".join(f"{n}={m}:{d}/{f}:{k}:40" for n, f, k in (("faithful-3shot", "Faithful_prompt.txt", 3),
                                                              ("hhh-3shot", "HHH_prompt.txt", 3),
                                                              ("hhh-0shot", "HHH_prompt.txt", 0)))
    almost.main(["--profile=chat", f"--model={m}", f"--out={tmp_path}", "--n_queries=6", "--n_rl_queries=4", "--batch_size=12",
                 "--device=cpu",
                 f"--generators={gens}", f"--assistant={m}:{d}/Faithful_prompt.txt:3:32", "--n=2",
                 "--selfplay_baseline=false", "--ppo.steps=1", "--eval_max_items=3", "--eval_rm_items=3",
                 "--ppo.batch_size=4", "--ppo.minibatch=4", "--ppo.ppo_epochs=1", "--ppo.max_new_tokens=16",
                 "--check_items=3", "--sft.epochs=1",
                 "--stages=queries,responses,compare,check,rm,selfplay,sft,ppo,eval,report"])   # (dpo: test_dpo.py)
    cfg = read_json(str(tmp_path / "almost_config.json"))
    assert cfg["model"] == m and cfg["rubric"] == "faithful-3shot>hhh-3shot>hhh-0shot" and cfg["trim_cut"]
    rs = read_records(str(tmp_path / "responses.jsonl"))
    assert len(rs) == 18 and {r["config"] for r in rs} == {"faithful-3shot", "hhh-3shot", "hhh-0shot"}
    check = read_json(str(tmp_path / "check_stats.json"))
    assert set(check["configs"]) <= {r["config"] for r in rs}
    for axis, a in check["axes"].items():
        assert axis in ("faithful-3shot > hhh-3shot", "hhh-3shot > hhh-0shot") and 1 <= a["n"] <= 3
        assert a["judge_is_a_generator"] and a["verdict"]
    rm_stats = read_json(str(tmp_path / "rm_stats.json"))
    for k in ("filter", "nofilter"):
        assert {"held_out", "static_hhh", "hh_harmless", "hh_helpful"} <= set(rm_stats[k])
        assert rm_stats[k]["hh_helpful"]["n"] == 3 and rm_stats[k]["static_hhh"]["n"] == 3
    sp = read_records(str(tmp_path / "selfplay_n2.jsonl"))
    assert sp and all(len(r["candidates"][0]) == 2 for r in sp if r["candidates"])
    assert all(len([t for t in r["turns"] if t["role"] == "assistant"]) <= 1 for r in sp)   # the profile's 1 turn
    ev = read_json(str(tmp_path / "eval" / "results.json"))
    assert set(ev["models"]) == {"base", "sft", "ppo"} and not ev["vicuna"] and not ev["rm"]
    assert set(read_json(str(tmp_path / "timings.json"))) == set(almost.STAGES) - {"dpo"}
    report = (tmp_path / "report.md").read_text()
    for line in ("reward model on static HHH (3 pairs)", "the HH harmless test split (3 pairs)",
                 "the rubric's claim faithful-3shot > hhh-3shot", "ppo as judge on static HHH"):
        assert line in report


# -----------------------------------------------------------------------------
# flags and profiles

def test_flags_given_win_over_the_profile_whatever_their_value():
    """A flag on the command line wins over a profile even when it equals the trainer's default (--sft.lr=2e-5 is
    sft.py's default; the story profile's is 5e-4); rm.py's own --preset gives way to flags given (--epochs=1 is the
    default, the tiny preset's 3)."""
    import almost
    import rm as rmlib
    from common import parse_args
    lr = lambda argv: almost.sft_config(resolve(parse_args(Config, argv)), "d.jsonl", "o", "base").lr  # noqa: E731
    assert lr([]) == 5e-4 and lr(["--sft.lr=2e-5"]) == 2e-5 and lr(["--sft.lr=1e-3"]) == 1e-3
    assert almost.sft_config(resolve(parse_args(Config, ["--sft.batch_size=4"])), "d", "o", "b").batch_size == 4
    assert resolve(parse_args(Config, ["--profile=chat", f"--model={os.path.join(ROOT, 'data', 'stories260K')}",
                                       "--turns=2"])).turns == 2                         # the chat profile's is 1
    for argv, epochs in [([], 3.0), (["--epochs=1"], 1.0), (["--epochs=1.0", "--lr=1e-3"], 1.0)]:
        cfg = parse_args(rmlib.TrainConfig, ["--preset=tiny", "--data=x.jsonl", *argv])
        rmlib.check_config(cfg)
        assert cfg.epochs == epochs


def test_each_trainer_setting_has_one_spelling_from_the_pipeline():
    """A profile holds the trainers' own configs; --rm.FLAG, --sft.FLAG and --ppo.FLAG set any of their flags, in the
    trainer's own words, over the profile (at the default's value too), and the rest stays the profile's; the files
    that connect the stages, and the seed, stay the pipeline's; the pipeline's scale flags reach every trainer; a bad
    flag names itself; a flag of another spelling names this one."""
    import almost
    from common import UserError, parse_args
    cfg = resolve(parse_args(Config, ["--ppo.kl_target=6", "--ppo.lam=1.0", "--sft.lr=2e-5", "--sft.warmup=0.1",
                                      "--rm.lr=1e-3", "--rm.epochs=1", "--ppo.steps=5", "--lora_rank=4"]))
    ppo = almost.ppo_config(cfg, "policy", "prompts.jsonl")
    assert (ppo.kl_target, ppo.lam, ppo.steps, ppo.max_new_tokens) == (6.0, 1.0, 5, 120)   # the profile's 120 tokens
    assert (ppo.policy, ppo.out, ppo.seed, ppo.lora_rank) == ("policy", os.path.join("out", "ppo"), 1337, 4)
    sft = almost.sft_config(cfg, "d.jsonl", "o", "base")
    assert (sft.lr, sft.warmup, sft.batch_size, sft.lora_rank) == (2e-5, 0.1, 16, 4)   # 2e-5: sft.py's default
    tc = almost.rm_config(cfg, "train.jsonl", "val.jsonl", "o")
    assert (tc.lr, tc.epochs, tc.batch_size, tc.model, tc.preset) == (1e-3, 1.0, 32, almost.STORIES260K, "")
    other = almost.rm_config(resolve(parse_args(Config, [f"--rm.model={almost.STORIES50K}"])), "t", "v", "o")
    assert other.model == almost.STORIES50K and other.lr == 1e-3                      # the profile's lr
    plain = resolve(parse_args(Config, []))
    assert almost.ppo_config(plain, "p", "q").kl_target == 4.0 and almost.sft_config(plain, "d", "o", "b").lr == 5e-4
    for argv, words in [(["--ppo.out=elsewhere"], "--ppo.out: set by the pipeline"), (["--ppo.seed=3"], "set by the"),
                        (["--sft.bogus=1"], "unknown flag --sft.bogus"), (["--rm.lr=fast"], "--rm.lr='fast': expected"),
                        (["--ppo_steps=5"], "--ppo_steps: spelled --ppo.steps"), (["--rm_args=--lr=1"], "--rm.FLAG"),
                        (["--ppo=3"], "--ppo.FLAG=VALUE")]:
        with pytest.raises(UserError, match=words):   # before any stage runs
            resolve(parse_args(Config, argv))


# -----------------------------------------------------------------------------
# the same seed, one model at a time, Qwen2, torchrun, memory plans

TIMING = ("_per_s", "_time", "time_share", "elapsed", "seconds")


def without_timings(x, out):
    """A record with every clock reading left out (throughput, step times) and the run's folder named "OUT": what the
    same seed must reproduce."""
    if isinstance(x, dict):
        return {k: without_timings(v, out) for k, v in x.items() if not k.endswith(TIMING)}
    if isinstance(x, list):
        return [without_timings(v, out) for v in x]
    return x.replace(str(out), "OUT") if isinstance(x, str) else x


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run(tmp_path):
    """Two runs of the whole pipeline with one seed, in two processes: every record, metric, verdict and weight is
    the same (clock readings aside). Another seed makes other queries."""
    import subprocess
    import sys
    flags = ["--n_queries=8", "--n_rl_queries=4", "--rm_filter_ablation=false", "--selfplay_baseline=false",
             "--turns=1", "--ppo.steps=2", "--eval_max_items=4", "--eval_vicuna=false", "--device=cpu"]
    runs = {}
    for name, seed, stages in (("a", 7, []), ("b", 7, []), ("c", 8, ["--stages=queries"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), f"--out={out}", f"--seed={seed}", *flags,
                            *stages],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = out
    a, b = runs["a"], runs["b"]
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    compared = 0
    for f in files:
        if f.endswith(".safetensors"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
        elif f.endswith(".jsonl"):
            assert [without_timings(r, a) for r in read_records(str(a / f))] == \
                   [without_timings(r, b) for r in read_records(str(b / f))], f
        elif f.endswith(".json") and f != "timings.json":
            assert without_timings(read_json(str(a / f)), a) == without_timings(read_json(str(b / f)), b), f
        else:
            continue
        compared += 1
    assert compared > 20 and "verdicts.json" in files and "ppo/last/policy/model.safetensors" in files
    assert read_records(str(a / "queries.jsonl")) != read_records(str(runs["c"] / "queries.jsonl"))


@pytest.mark.slow
def test_each_stage_holds_one_generator_or_policy_at_a_time(tmp_path, monkeypatch):
    """The paper's generators are 30B models (60 GiB each in bf16): a stage that moves from one to the next lets the
    last one go before the next loads. At every model.load of the responses stage, of SFT's policy comparison and of
    the evaluation, no model that stage loaded before is alive (a weakref, after a garbage collection); the judges a
    stage keeps beside them (the reward model) are loaded another way."""
    import gc
    import weakref
    import eval as evallib
    import model as modellib
    import selfplay
    from rm import RewardModel
    loaded, real = [], modellib.load

    def load(path, *a, **k):
        gc.collect()
        assert all(r() is None for r in loaded), "an earlier model of this stage is still in memory"
        model, tok = real(path, *a, **k)
        loaded.append(weakref.ref(model))
        return model, tok
    for module in (comparisons, selfplay, evallib):
        monkeypatch.setattr(module, "load", load)
    cfg = tiny(tmp_path, n_queries=4)
    os.makedirs(cfg.out, exist_ok=True)
    almost.write_jsonl(os.path.join(cfg.out, "queries.jsonl"), [{"id": i, "query": q} for i, q in enumerate(
        ["Once upon a time, a cat sat.", "Tom had a red ball.", "The sun was hot.", "Lily saw a big dog."])])
    comparisons.stage_responses(cfg)                         # 4 generators on two models: 260K twice, then 50K twice
    assert len(loaded) == 2 and len(read_records(os.path.join(cfg.out, "responses.jsonl"))) == 16
    rm_dir = str(tmp_path / "rm")
    stories = os.path.join(ROOT, "data", "stories260K")
    RewardModel.from_pretrained(stories).save_pretrained(rm_dir)
    cfg.reward_model = rm_dir
    loaded.clear()
    stats = selfplay.compare_policies(cfg, {"base": stories, "sft": stories, "sft_plain": stories}, 8, {})
    assert len(loaded) == 3 and set(stats) == {"base", "sft", "sft_plain"}
    loaded.clear()
    evallib.evaluate(evallib.Config(models=f"a={stories},b={stories},c={stories}", rm=rm_dir, max_items=3,
                                    max_new_tokens=6, rm_sets=False, out=str(tmp_path / "eval"), device="cpu"))
    assert len(loaded) == 3


@pytest.mark.slow
def test_chat_profile_runs_end_to_end_on_a_qwen2_folder(qwen2_stories, tmp_path):
    """--profile=chat on a Qwen2 folder (conftest.qwen2_stories: q/k/v biases, tied head, a vocabulary padded past the
    tokenizer), made small: every stage runs, the reward models are Qwen2ForSequenceClassification checkpoints that
    transformers loads, the SFT and PPO policies stay Qwen2ForCausalLM, and the report gives its verdicts."""
    d, m = os.path.join(ROOT, "data", "almost"), qwen2_stories
    gens = ",".join(f"{n}={m}:{d}/{f}:{k}:40" for n, f, k in (("faithful-1shot", "Faithful_prompt.txt", 1),
                                                              ("hhh-1shot", "HHH_prompt.txt", 1),
                                                              ("hhh-0shot", "HHH_prompt.txt", 0)))
    almost.main(["--profile=chat", f"--model={m}", f"--out={tmp_path}", "--n_queries=40", "--n_rl_queries=4",
                 "--batch_size=20", "--device=cpu", "--query_line=first", f"--generators={gens}",
                 "--rubric=faithful-1shot>hhh-1shot>hhh-0shot", f"--assistant={m}:{d}/Faithful_prompt.txt:1:32",
                 f"--user={m}:{d}/HHH_prompt.txt:1:24", "--n=2", "--selfplay_baseline=false", "--ppo.steps=1",
                 "--eval_max_items=3", "--eval_rm_items=3", "--check_items=3", "--sft.epochs=1",
                 "--ppo.batch_size=4", "--ppo.minibatch=4", "--ppo.ppo_epochs=1", "--ppo.max_new_tokens=16",
                 "--dpo_pairs=synthetic"])   # (a random model's 16-token answers rarely end a sentence: few on-policy pairs)
    for f in ("rm/last", "sft/best", "ppo/last/policy", "ppo/last/value", "dpo/last"):
        cfg = read_json(str(tmp_path / f / "config.json"))
        kind = "ForSequenceClassification" if f.startswith("rm") or f.endswith("value") else "ForCausalLM"
        assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2" + kind], f
    transformers = pytest.importorskip("transformers")
    transformers.Qwen2ForSequenceClassification.from_pretrained(str(tmp_path / "rm" / "last"))
    assert len(read_records(str(tmp_path / "responses.jsonl"))) == 120 and read_records(str(tmp_path / "comparisons.jsonl"))
    assert set(read_json(str(tmp_path / "eval" / "results.json"))["models"]) == {"base", "sft", "ppo", "dpo"}
    assert "## Did it work?" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_almost_under_torchrun_runs_only_trainer_stages(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "almost.py"), f"--out={tmp_path}", "--stages=queries,rm"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2 and "only the trainer stages" in r.stderr


@pytest.mark.slow
def test_almost_dry_run_plans_the_sampling_stages():
    """The paper's command with shapes for folders: every sampling model is planned at --batch_size rows of its
    context; at 32 rows the 30B generator does not fit, at the README's 4 it does."""
    d = os.path.join(ROOT, "data", "almost")
    gens = (f"30b-faithful-3shot=llama-30b:{d}/Faithful_prompt.txt:3,13b-hhh-3shot=llama-13b:{d}/HHH_prompt.txt:3,"
            f"7b-hhh-1shot=llama-7b:{d}/HHH_prompt.txt:1")
    base = [os.path.join(ROOT, "almost.py"), "--profile=paper", "--dry_run=true", "--device=cuda",
            "--query_model=llama-7b", "--rm.model=llama-7b", f"--generators={gens}",
            "--rubric=30b-faithful-3shot>13b-hhh-3shot>7b-hhh-1shot", f"--assistant=llama-30b:{d}/Faithful_prompt.txt:3",
            f"--user=llama-30b:{d}/HHH_prompt.txt:3", "--sft.model=llama-7b", "--lora_rank=16",
            "--grad_checkpointing=true", "--stages=queries,responses,selfplay"]
    r = subprocess.run([sys.executable, *base], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    plan30 = r.stdout[r.stdout.index("memory plan (sample, llama-30b, 32 rows x 2048"):]
    assert "does NOT fit in 80 GiB" in plan30.split("(used by")[0] and "largest batch that fits: 5 rows" in plan30
    assert "responses 30b-faithful-3shot, selfplay assistant, selfplay user" in plan30
    r = subprocess.run([sys.executable, *base, "--batch_size=4"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "does NOT fit" not in r.stdout, r.stdout
