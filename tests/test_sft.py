"""sft.py: the loss mask on the assistant's tokens (plain, and under a chat template), right-padded rows without a mask,
and a run that learns and reloads to identical logits."""
import json
import os

import pytest
import torch

from conftest import ROOT
from tokenizer import Tokenizer


def test_sft_loss_mask_is_exactly_the_assistant_tokens(stories):
    from sft import encode_dialogue
    _, tok = stories
    turns = [("user", "Once upon a time, Tom found a ball."), ("assistant", "He played with it all day. He was happy."),
             ("user", "Then it started to rain."), ("assistant", "Tom ran home and drank warm milk!")]
    final, final_mask = encode_dialogue(tok, turns, 512)                      # the default: the final response only
    ids, mask = encode_dialogue(tok, turns, 512, loss_on="all")
    assert final == ids and final_mask != mask
    assert tok.decode([i for i, m in zip(ids, final_mask) if m]) == turns[3][1]  # and its EOS
    assert final_mask[-1] and sum(final_mask) == sum(mask[len(mask) - sum(final_mask):])
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] and not mask[0]
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tok.decode(s) for s in spans] == [turns[1][1], turns[3][1]]  # EOS decodes to ""
    assert spans[-1][-1] == tok.eos_id                                     # the last turn's span ends with EOS
    # the unmasked tokens are the human turns and the role tags, nothing of the assistant's
    unmasked = tok.decode([i for i, m in zip(ids[1:], mask[1:]) if not m])
    assert "Tom found a ball" in unmasked and "rain" in unmasked and "happy" not in unmasked and "milk" not in unmasked
    # prompt-then-generate tokenization equals the masked split: the prompt is exactly the unmasked prefix
    from tokenizer import format_dialogue
    prompt = tok.encode(format_dialogue(turns[0][1]), bos=True)
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and mask[len(prompt)]
    assert encode_dialogue(tok, turns, 20) is None                          # longer than max_length


def test_sft_mask_under_a_chat_template(chatml_tokenizer):
    from sft import encode_dialogue
    tok = Tokenizer(chatml_tokenizer)
    turns = [("user", "Hi!"), ("assistant", "Hello there."), ("user", "Bye."), ("assistant", "Goodbye!")]
    ids, mask = encode_dialogue(tok, turns, 512, chat=True, loss_on="all")
    assert tok.decode(ids) == tok.apply_chat_template([{"role": r, "content": t} for r, t in turns], False)
    said = tok.decode([i for i, m in zip(ids, mask) if m])
    assert said == "Hello there.<|im_end|>\nGoodbye!<|im_end|>\n"                 # the assistant's turns, and only them
    ids, mask = encode_dialogue(tok, turns, 512, chat=True)                          # the default: the final one
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Goodbye!<|im_end|>\n"


def test_sft_runs_right_padded_rows_without_a_mask(stories, monkeypatch):
    """SFT's rows are right-padded, so causal attention alone is exact for every real token: its forward passes no
    mask (a GPU then runs flash attention), and the loss is the masked forward's."""
    import sft
    model, tok = stories
    batch = [(ids, [True] * len(ids)) for ids in (tok.encode("Once upon a time there was a dog"), tok.encode("Hi"))]
    seen, real = [], model.forward
    monkeypatch.setattr(model, "forward", lambda idx, *a, **k: seen.append(k.get("mask")) or real(idx, *a, **k))
    with torch.no_grad():
        loss, n = sft.sft_loss(model, batch, torch.device("cpu"), torch.float32)
    assert seen == [None]
    T = max(len(ids) for ids, _ in batch)
    idx, mask = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.bool)
    for r, (ids, _) in enumerate(batch):
        idx[r, :len(ids)], mask[r, :len(ids)] = torch.tensor(ids), True
    with torch.no_grad():
        logits = real(idx, mask=mask)
    tgt = torch.where(mask[:, 1:], idx[:, 1:], -100)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), reduction="sum")
    assert n == int(mask[:, 1:].sum()) and torch.allclose(loss, want, rtol=1e-6)


@pytest.mark.slow
def test_sft_trains_on_selfplay_and_reloads_to_identical_logits(tmp_path):
    import torch
    from model import Llama
    import sft
    turns = [("user", "Once upon a time, Tom found a ball."), ("assistant", "He played with it all day. He was happy.")]
    path = tmp_path / "sp.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            f.write(json.dumps({"query_id": i, "usable": True, "turns": [{"role": r, "text": t} for r, t in turns]}) + "\n")
    cfg = sft.Config(data=str(path), model=os.path.join(ROOT, "data", "stories260K"), out=str(tmp_path / "sft"),
                     epochs=2.0, batch_size=8, micro_batch=4, eval_every=2, device="cpu")
    state, model = sft.train(cfg)
    assert state["step"] == 4
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "sft" / "metrics.jsonl") if '"train"' in l]
    assert losses[-1] < losses[0]                                      # it learns the one dialogue
    again = Llama.from_pretrained(str(tmp_path / "sft" / "last"))
    idx = torch.tensor([[1, 400, 401, 260, 300, 12, 99]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sft" / "last").eval()
    with torch.no_grad():
        assert (hf(idx).logits - again(idx)).abs().max().item() < 1e-4
    # a rerun finds the finished run and does not train again
    state2, _ = sft.train(cfg)
    assert state2["step"] == 4 and len(open(tmp_path / "sft" / "metrics.jsonl").readlines()) == len(losses) + 2
