"""trainer.py: bf16 autocast over fp32 masters, non-finite gradients, LoRA checkpoints in PEFT's layout, and torchrun (DDP
and FSDP over 2 gloo processes on the CPU, against one process on the same global batch) for rm.py, sft.py and ppo.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES, eos_prone_policy, launch, small_cfg, toy_pairs, write_jsonl
from lora import add_lora
from model import Llama, UserError


# -----------------------------------------------------------------------------
# precision, non-finite gradients, LoRA checkpoints

@pytest.mark.slow
def test_bf16_autocast_trains_fp32_masters_with_bf16_activations(tmp_path):
    from rm import TrainConfig, train
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(24))
    cfg = TrainConfig(data=data, preset="tiny", out=str(tmp_path / "rm"), batch_size=8, micro_batch=4,
                      eval_every=2, max_length=48, dtype="bf16", device="cpu")
    state = train(cfg)
    assert state["step"] == 6                                             # the tiny preset's 3 epochs
    rec = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl") if '"train"' in line]
    assert rec[-1]["loss"] < rec[0]["loss"]                               # it learns in bf16
    from safetensors import safe_open
    with safe_open(tmp_path / "rm" / "last" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}   # fp32 masters are what is saved
    with pytest.raises(UserError, match="loss scaling"):
        train(TrainConfig(data=data, preset="tiny", out=str(tmp_path / "rm16"), dtype="fp16", device="cpu"))
    # under autocast the KV cache and the activations are bf16, the master weights stay fp32
    model = Llama(small_cfg()).init_weights()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 8)
        logits = model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert cache.k[0].dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32


def test_a_nan_gradient_skips_the_step_and_a_run_of_them_stops(capsys):
    """One non-finite gradient would make the weights and AdamW's moments NaN for good: the step is skipped (weights
    and moments unchanged), counted in the state and said; max_bad_steps in a row stop the run with one message."""
    from sft import Config
    from trainer import make_optimizer, optimizer_step
    model = Llama(small_cfg()).init_weights()
    params = [p for p in model.parameters()]
    opt = make_optimizer(model, 1e-2, 0.0)
    cfg, state = Config(max_bad_steps=2), {"step": 0}
    idx = torch.randint(0, 96, (2, 6))
    model(idx).logsumexp(-1).sum().backward()
    optimizer_step(params, opt, cfg, 1.0, state)                          # a good step: moments exist
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    model(idx).logsumexp(-1).sum().backward()
    params[3].grad.view(-1)[0] = float("nan")
    norm = optimizer_step(params, opt, cfg, 1.0, state)
    assert norm != norm and state["skipped_steps"] == 1 and "skipped" in capsys.readouterr().err
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, params))
    assert all(p.grad is None for p in params)
    model(idx).logsumexp(-1).sum().backward()
    params[0].grad.view(-1)[0] = float("inf")
    with pytest.raises(UserError, match="2 optimizer steps in a row had a non-finite gradient norm"):
        optimizer_step(params, opt, cfg, 1.0, state)


@pytest.mark.slow
def test_lora_checkpoints_load_in_peft(tmp_path):
    """A LoRA run's checkpoint holds its adapters in PEFT's layout: peft.PeftModel.from_pretrained on the base model
    gives our scores (a reward model: adapters + head) and our logits (a policy)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from rm import RewardModel, TrainConfig, train
    from trainer import save_training_checkpoint
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(40))
    train(TrainConfig(data=data, preset="tiny", out=str(tmp_path / "rm"), batch_size=8, micro_batch=4, epochs=0.5,
                      eval_every=2, max_length=48, device="cpu", lora_rank=4, lora_targets="q_proj,v_proj,down_proj"))
    last = tmp_path / "rm" / "last"
    assert json.load(open(last / "adapter_config.json"))["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    ours = RewardModel.from_pretrained(str(last))                      # the merged checkpoint
    texts = [("Tell me about Tom.", "Tom was happy."), ("A story?", "The dog ran away and was sad.")]
    scores = ours.score([p for p, _ in texts], [r for _, r in texts])
    base = transformers.AutoModelForSequenceClassification.from_pretrained(STORIES, num_labels=1, pad_token_id=0)
    hf = peft.PeftModel.from_pretrained(base, str(last)).eval()
    from rm import encode
    from model import pad_batch
    idx, mask = pad_batch([encode(ours.tok, p, r, 48) for p, r in texts], left=False)
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask.long()).logits[:, 0]
    assert torch.allclose(scores, theirs, atol=1e-4), (scores, theirs)
    # a policy: adapters on a causal LM
    torch.manual_seed(0)
    policy = Llama.from_pretrained(STORIES)
    params = add_lora(policy, rank=4, alpha=8, targets=("q_proj", "up_proj"))
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    opt = torch.optim.AdamW(params)
    save_training_checkpoint(policy.save_pretrained, params, opt, str(tmp_path / "policy"), {"step": 1}, policy)
    idx = torch.tensor([[1, 400, 401, 260, 300, 12, 99]])
    hf = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(STORIES),
                                        str(tmp_path / "policy")).eval()
    with torch.no_grad():
        assert (hf(idx).logits - policy(idx)).abs().max().item() < 1e-4


# -----------------------------------------------------------------------------
# torchrun: 2 gloo processes against 1 process on the same global batch

def max_diff(a, b):
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)
    d = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    print(f"max |difference| {d:.1e}: {os.path.relpath(a, os.path.dirname(os.path.dirname(a)))} vs {b}")  # pytest -s
    return d


def train_losses(path):
    return [json.loads(line)["loss"] for line in open(path) if '"train"' in line or '"split"' not in line]


# Tolerance: summing gradients over processes changes only the order of float additions (~1e-7 relative);
# AdamW's first steps move each weight by about lr whatever the gradient's size, so after a few steps at lr 1e-3
# the weights agree to ~5e-5. We allow 3e-4 on any weight and 1e-5 (relative) on every logged loss.
WEIGHT_TOL = 3e-4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    return write_jsonl(d / "pairs.jsonl", toy_pairs(40))


RM_ARGS = ["--preset=tiny", "--batch_size=8", "--micro_batch=2", "--epochs=0.5", "--eval_every=3", "--log_every=1",
           "--max_length=48", "--device=cpu"]


GRADIENTS = """
import sys
import torch
from safetensors.torch import save_file
from common import rank
from lora import full_tensor
from readers import read_pairs
from rm import RewardModel, TrainConfig, tokenize_pairs, train_step
from trainer import end_distributed, setup_distributed, sync_grads
from trainer import prepare_for_training
model_dir, pairs, mode, out = sys.argv[1:]
setup_distributed("cpu")
reward_model = RewardModel.from_pretrained(model_dir, seed=0)   # the same fresh head in every process
cfg = TrainConfig(device="cpu", micro_batch=2, fsdp=mode == "fsdp")
params = prepare_for_training(reward_model, cfg, torch.float32)
batch = tokenize_pairs(reward_model, read_pairs(pairs), pairs)
train_step(reward_model, batch, cfg, torch.device("cpu"), torch.float32, [0.0] * 4)
sync_grads(params, cfg)                                             # DDP's sum (FSDP reduced in backward)
grads = {f"grad.{i}": full_tensor(p.grad).contiguous() for i, p in enumerate(params)}
with torch.no_grad():                                               # one plain SGD step: the update is the gradient
    for p in params:
        p.add_(p.grad, alpha=-0.5)
weights = {f"weight.{i}": full_tensor(p).contiguous() for i, p in enumerate(params)}
if rank() == 0:
    save_file({**grads, **weights}, out)
del reward_model, params
end_distributed()
"""


@pytest.mark.slow
def test_gradients_and_an_sgd_step_on_two_processes_equal_one(tmp_path):
    """AdamW's update ignores a constant factor on the gradient, so comparing weights after AdamW steps cannot see a
    reduction that averages instead of sums, or a lost FSDP divide factor. Here the gradients themselves (after the
    trainer's reduction, before any optimizer) and the weights after one plain SGD step are compared: one process
    against two with DDP and with FSDP, on 5 pairs (shares of 3 and 2: the short process runs a zero-weight
    micro-batch). A reduction off by the factor 2 fails by far more than the tolerance."""
    from safetensors.torch import load_file
    script = tmp_path / "grads.py"
    script.write_text(GRADIENTS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(5, seed=7))
    launch(str(script), [STORIES, pairs, "one", str(tmp_path / "one.safetensors")], 1, tmp_path)
    one = load_file(tmp_path / "one.safetensors")
    assert max(v.abs().max().item() for k, v in one.items() if k.startswith("grad.")) > 1e-3   # a real gradient
    for mode in ("ddp", "fsdp"):
        launch(str(script), [STORIES, pairs, mode, str(tmp_path / f"{mode}.safetensors")], 2, tmp_path, timeout=120)
        two = load_file(tmp_path / f"{mode}.safetensors")
        assert sorted(two) == sorted(one)
        for k in one:
            scale = one[k].abs().max().item()
            assert (two[k] - one[k]).abs().max().item() <= 1e-5 * max(scale, 1.0), (mode, k)


@pytest.mark.slow
def test_rm_ddp_and_fsdp_match_one_process(tmp_path, pairs):
    args = [f"--data={pairs}", *RM_ARGS]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=ddp"], 2, tmp_path)
    launch("rm.py", [*args, "--out=fsdp", "--fsdp=true", "--grad_checkpointing=true"], 2, tmp_path)
    for other in ("ddp", "fsdp"):
        assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / f"{other}/last/model.safetensors") < WEIGHT_TOL
        assert train_losses(tmp_path / "one/metrics.jsonl") == pytest.approx(
            train_losses(tmp_path / f"{other}/metrics.jsonl"), rel=1e-5)
    # an FSDP checkpoint holds whole tensors (weights and optimizer moments; the run's final checkpoint keeps no
    # moments, so this one stops before the end): one process resumes it and ends where one process alone ends
    launch("rm.py", [*args, "--out=mixed", "--fsdp=true", "--stop_after=1"], 2, tmp_path)
    launch("rm.py", [*args, "--out=mixed"], 1, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "mixed/last/model.safetensors") < WEIGHT_TOL


@pytest.mark.slow
def test_fsdp_bf16_checkpoints_hold_the_fp32_masters(tmp_path, pairs):
    """Under FSDP with bf16 compute the root module keeps bf16 copies after a forward; a checkpoint must hold the
    fp32 master weights (what a resumed run trains on), not those copies."""
    launch("rm.py", [f"--data={pairs}", *RM_ARGS, "--out=bf", "--fsdp=true", "--dtype=bf16"], 2, tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "bf/last/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert json.load(open(tmp_path / "bf/last/config.json"))["torch_dtype"] == "float32"


@pytest.mark.slow
def test_fsdp_with_a_batch_that_does_not_split_evenly(tmp_path):
    """5 training pairs, micro-batches of 2, 2 processes: shares of 3 and 2 pairs, so process 1 runs a zero-weight
    micro-batch to stay in step with process 0's collectives (else FSDP hangs), and the result is still one
    process's."""
    data = write_jsonl(tmp_path / "six.jsonl", toy_pairs(6, seed=3))
    args = [f"--data={data}", *RM_ARGS, "--batch_size=8", "--eval_every=1"]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=two", "--fsdp=true"], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "two/last/model.safetensors") < WEIGHT_TOL
    assert train_losses(tmp_path / "one/metrics.jsonl") == pytest.approx(train_losses(tmp_path / "two/metrics.jsonl"),
                                                                           rel=1e-5)


@pytest.mark.slow
def test_rm_lora_under_fsdp_matches_one_process_and_resumes(tmp_path, pairs):
    args = [f"--data={pairs}", *RM_ARGS, "--lora_rank=4", "--lora_targets=q_proj,v_proj,gate_proj"]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=two", "--fsdp=true"], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/adapter_model.safetensors", tmp_path / "two/last/adapter_model.safetensors") < WEIGHT_TOL
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "two/last/model.safetensors") < WEIGHT_TOL
    # stop after one step, resume from base + adapters: the same end
    launch("rm.py", [*args, "--out=split", "--stop_after=1"], 1, tmp_path)
    launch("rm.py", [*args, "--out=split"], 1, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "split/last/model.safetensors") < 1e-6
    r = subprocess.run([sys.executable, os.path.join(ROOT, "rm.py"), f"--data={pairs}", *RM_ARGS, "--lora_rank=8",
                        "--out=split"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "another run" in r.stderr


@pytest.mark.slow
def test_a_qwen2_reward_model_with_lora_under_fsdp_matches_one_process(tmp_path, pairs, qwen2_stories):
    """The Qwen2 folder (q/k/v biases under the adapters, a tied, padded vocabulary) through rm.py with LoRA, alone
    and under FSDP over 2 processes: the same adapters, and a Qwen2ForSequenceClassification checkpoint."""
    args = [f"--data={pairs}", *RM_ARGS, f"--model={qwen2_stories}", "--lora_rank=4"]
    launch("rm.py", [*args, "--out=one"], 1, tmp_path)
    launch("rm.py", [*args, "--out=two", "--fsdp=true"], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/adapter_model.safetensors", tmp_path / "two/last/adapter_model.safetensors") < WEIGHT_TOL
    assert json.load(open(tmp_path / "two/last/config.json"))["architectures"] == ["Qwen2ForSequenceClassification"]


@pytest.mark.slow
@pytest.mark.parametrize("scale_flags", [[], ["--fsdp=true", "--grad_checkpointing=true"]], ids=["ddp", "fsdp"])
def test_sft_on_two_processes_matches_one(tmp_path, scale_flags):
    names, things = ["Tom", "Lily", "Max", "Sue", "Ben"], ["ball", "cat", "tree", "cake", "box", "bird"]
    rows = [{"query_id": i, "usable": True, "turns": [
        {"role": "user", "text": f"Once upon a time, {names[i % 5]} found a {things[i % 6]}."},
        {"role": "assistant", "text": f"{names[i % 5]} played with the {things[i % 6]} all day." + " It was fun." * (i % 3)}]}
        for i in range(30)]
    data = write_jsonl(tmp_path / "sp.jsonl", rows)
    flags = [f"--data={data}", f"--model={STORIES}", "--epochs=1", "--batch_size=8", "--micro_batch=2",
             "--eval_every=2", "--lr=1e-3", "--device=cpu"]
    launch("sft.py", [*flags, "--out=one"], 1, tmp_path)
    launch("sft.py", [*flags, "--out=two", *scale_flags], 2, tmp_path)
    assert max_diff(tmp_path / "one/last/model.safetensors", tmp_path / "two/last/model.safetensors") < WEIGHT_TOL
    assert max_diff(os.path.join(STORIES, "model.safetensors"), tmp_path / "one/last/model.safetensors") > 1e-3
    assert train_losses(tmp_path / "one/metrics.jsonl") == pytest.approx(train_losses(tmp_path / "two/metrics.jsonl"),
                                                                           rel=1e-5)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, pairs):
    d = tmp_path_factory.mktemp("rm")
    launch("rm.py", [f"--data={pairs}", *RM_ARGS, "--out=rm"], 1, d)
    return str(d / "rm" / "best")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--fsdp=true"], ["--lora_rank=4", "--grad_checkpointing=true"]],
                         ids=["ddp", "fsdp", "lora"])
def test_ppo_on_two_processes_matches_one(tmp_path, reward_model, flags):
    """One minibatch per rollout batch (minibatch = batch_size): the same rollouts (per-row sampler seeds), the
    same whitening (global statistics) and the same summed gradients."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about Lily.\nWhat is a dog?\nTom has a ball.\nSing a song.\nA big red car.\n")
    args = [f"--policy={STORIES}", f"--rm={reward_model}", f"--prompts={prompts}", "--steps=2", "--batch_size=4",
            "--minibatch=4", "--ppo_epochs=2", "--max_new_tokens=12", "--lr=1e-3", "--value_lr=1e-3",
            "--samples_per_log=0", "--penalize_missing_eos=false", "--device=cpu", *flags]
    launch("ppo.py", [*args, "--out=one"], 1, tmp_path)
    launch("ppo.py", [*args, "--out=two"], 2, tmp_path)
    for sub in ("policy", "value"):
        assert max_diff(tmp_path / f"one/last/{sub}/model.safetensors",
                        tmp_path / f"two/last/{sub}/model.safetensors") < WEIGHT_TOL
    one = [json.loads(line) for line in open(tmp_path / "one/metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two/metrics.jsonl")]
    for a, b in zip(one, two):
        for k in ("score_mean", "kl", "response_length", "non_score_reward"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5)
    assert abs(one[1]["kl"]) > 1e-4                                       # the second rollout comes from a new policy


LONG_OPENING = ("Once upon a time, there was a little girl named Lily. She loved to play in the park with her friends "
                "every day. One day she saw ")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ends", "prefix"])
def test_fsdp_ppo_with_rows_that_end_apart(tmp_path, reward_model, case):
    """A PPO step under FSDP whose rollout rows end at different steps on the two processes: at seed 1337's first
    step (found by hand, see the asserts) process 1's row ends at its first token while process 0's runs to the
    budget ("ends"); or process 1's two prompts share a long prefix and process 0's do not ("prefix"). The run
    finishes (a hang fails at the timeout) and matches one process."""
    policy = eos_prone_policy(tmp_path / "policy")
    prompts = tmp_path / "prompts.txt"
    rows = 2 if case == "ends" else 4
    prompts.write_text("Tell me about Lily.\nWhat is a dog?\n" if case == "ends" else
                       f"{LONG_OPENING}a cat.\n{LONG_OPENING}a big red ball.\nWhat is a dog?\nSing a song.\n")
    args = [f"--policy={policy}", f"--rm={reward_model}", f"--prompts={prompts}", "--steps=2",
            f"--batch_size={rows}", f"--minibatch={rows}", "--ppo_epochs=1", "--max_new_tokens=12", "--lr=1e-3",
            "--value_lr=1e-3", "--samples_per_log=0", "--penalize_missing_eos=false", "--device=cpu", "--fsdp=true"]
    launch("ppo.py", [*args, "--out=one"], 1, tmp_path)
    launch("ppo.py", [*args, "--out=two"], 2, tmp_path, timeout=180)
    one = [json.loads(line) for line in open(tmp_path / "one/metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two/metrics.jsonl")]
    if case == "ends":   # one response of 12 tokens (no EOS) and one of its EOS alone
        assert one[0]["eos_rate"] == 0.5 and one[0]["response_length"] == 6.5
    for a, b in zip(one, two):
        for k in ("score_mean", "kl", "response_length", "eos_rate"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5)
    assert max_diff(tmp_path / "one/last/policy/model.safetensors", tmp_path / "two/last/policy/model.safetensors") \
        < WEIGHT_TOL
