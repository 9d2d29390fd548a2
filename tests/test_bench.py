"""bench.py: the dispatch counter the sampler's tests count with, the per-token marginal count, and its cases run end
to end (the GPU cases' code at a tiny shape on the CPU; a decode case and a reward-model case against transformers)."""
import os
import subprocess
import sys

import pytest
import torch

from bench import DispatchCounter, per_token
from conftest import ROOT


def test_the_dispatch_counter_counts_host_reads_data_dependent_shapes_and_host_data_copied():
    """A value read on the host (item, tolist), an output whose size depends on the data (a boolean mask's
    indexing) and host data made into a tensor each count as a sync; plain arithmetic does not; the patched tensor
    methods are put back on exit."""
    tolist = torch.Tensor.tolist
    x = torch.arange(6.0)
    with DispatchCounter() as c:
        y = x * 2 + 1
        assert c.syncs == 0 and c.ops >= 2
        y.sum().item()
        x.tolist()
        _ = x[x > 2]
        torch.tensor([1.0, 2.0])
    assert c.syncs == 4, c.sync_ops
    assert c.sync_ops["_local_scalar_dense"] == 1 and c.sync_ops["tolist"] == 1 and c.sync_ops["lift_fresh"] == 1
    assert torch.Tensor.tolist is tolist
    with DispatchCounter() as d:
        pass
    x.tolist()
    assert d.syncs == 0                                           # nothing is counted outside the block


def test_per_token_cancels_a_calls_fixed_cost():
    """per_token counts run(n) at n and 2n: what every call does once (a prefill, a return) cancels, what it does a
    token remains."""
    def run(n):
        x = torch.ones(3)
        x.tolist()                                               # once a call: one sync, cancelled
        for _ in range(n):
            x = x + 1                                            # one op a token
        for _ in range(n // 2):
            x.sum().item()                                       # a sync every other token
    ops, syncs = per_token(run, 8)
    assert syncs == 0.5 and ops == pytest.approx(1.0 + 0.5 * 2)   # add, and sum + item every other token


def bench(*args, timeout=600):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_the_gpu_cases_run_their_code_on_a_cpu_at_a_tiny_shape():
    """decode_7b, rm_step_7b and ppo_step_7b run through the project's sampler and trainers at --shape=tiny: one host
    sync a decoded token on the CPU, and an RM step and a PPO step with LoRA and checkpointing beside their plans."""
    out = bench("--cases=decode_7b,rm_step_7b,ppo_step_7b", "--shape=tiny")
    assert "host syncs per token 1.000" in out, out
    assert "rm_step_7b tiny: ran in" in out and "ppo_step_7b tiny: ran in" in out, out


@pytest.mark.slow
def test_a_decode_case_and_a_reward_model_case_agree_with_transformers():
    """The decode case's tokens equal transformers' generate() on the same weights; the reward-model case's scores
    equal LlamaForSequenceClassification's."""
    pytest.importorskip("transformers")
    out = bench("--cases=260k_b1,rm_260k", "--repeats=1", "--new_tokens=16")
    assert "same tokens: True" in out, out
    diff = float(out.split("max score diff")[1].split()[0])
    assert diff < 1e-4, out
