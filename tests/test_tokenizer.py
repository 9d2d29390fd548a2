"""tokenizer.py: byte-level BPE from tokenizer.json, token for token as transformers; the files checkpoints carry; the
bundled SentencePiece tokenizer; the authors' post-processing of a response."""
import gzip
import json
import os

import pytest

from conftest import ROOT, STORIES
from tokenizer import Tokenizer, postprocess_response

PARITY_TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé São Paulo Ærøskøbing", "日本語のテキスト、中文文本。한국어 텍스트", "Здравствуй, мир! Γειά σου",
    "emoji 😀👍🏽 and a flag 🇫🇷 and a family 👨‍👩‍👧", "digits 1234567 3.14159 1,000,000 ²³ ½ Ⅻ",
    "  leading spaces, runs   of    spaces\n\n\nand newlines\n", "tab\there \r\n crlf \u00a0nbsp\u2003em",
    "def f(x):\n    return x**2  # a comment\n\tif x != 0: print(f'{x!r}')",
    "it's I'm we'll they've you'd don't SHOULDN'T O'Neil", " ", "", "x" * 80, "a\u0301 combining",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
    "text<|im_end|>glued<|endoftext|>", "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
]


def hh_texts(n):
    out = []
    with gzip.open(os.path.join(ROOT, "data", "hh-rlhf", "helpful-base", "test.jsonl.gz"), "rt") as f:
        for line in f:
            d = json.loads(line)
            out += [d["chosen"], d["rejected"]]
            if len(out) >= n:
                return out
    return out


def assert_parity(ours, hf, texts, roundtrip=True):
    """Our ids equal transformers' for every text, our decoding equals theirs, and (byte-level BPE) decoding gives
    the text back exactly. (A SentencePiece-style tokenizer drops a text's leading space, in both.)"""
    for t in texts:
        ids = ours.encode(t, bos=True)
        assert ids == hf(t)["input_ids"], t
        assert ours.decode(ids) == hf.decode(ids), t
        if roundtrip:
            assert ours.decode(ours.encode(t, bos=False)) == t                   # exact round trip


def test_smollm2_bpe_matches_transformers(smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(smollm2_tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == ("bpe", 49152, 1, 2, 2, False)
    assert_parity(tok, hf, PARITY_TEXTS + hh_texts(300))
    assert tok.encode("<|im_start|>")[0] == 1 and len(tok.encode("<|im_start|>")) == 1   # a special token is one id


LLAMA3_TEMPLATE = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
                   "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def llama3_style_folder(d):
    """A small tokenizer folder written the way Llama-3's is: the Llama-3 split regex, byte-level BPE with
    ignore_merges, <|begin_of_text|> added by the post-processor's template, a Llama-3 style chat template."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    t = HFTokenizer(models.BPE(ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    t.train_from_iterator(hh_texts(400) + PARITY_TEXTS, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = t.token_to_id("<|begin_of_text|>")
    t.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])])
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE}))
    return t


def test_llama3_style_tokenizer_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    t = llama3_style_folder(tmp_path)
    tok = Tokenizer(str(tmp_path))
    assert tok.add_bos and tok.bos_id == t.token_to_id("<|begin_of_text|>") and tok.eos_id == t.token_to_id("<|eot_id|>")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_parity(tok, hf, PARITY_TEXTS + hh_texts(100))


QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def qwen2_style_folder(d):
    """A small tokenizer folder written the way Qwen2 / Qwen2.5's is: NFC normalisation, Qwen's split regex (one digit
    a word), byte-level BPE, no BOS, ChatML special tokens with <|im_end|> as EOS, a ChatML chat template."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer
    t = HFTokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    t.train_from_iterator(hh_texts(400) + PARITY_TEXTS, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace", "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "unk_token": None, "chat_template": CHATML}))   # (Qwen2.5's keys)
    return t


def test_qwen2_style_tokenizer_json(tmp_path):
    """Qwen2's tokenizer.json (its split pattern with one digit a word, NFC, ChatML special tokens, no BOS): token
    for token with transformers on accents (composed and decomposed), digits, CJK, emoji and special tokens."""
    transformers = pytest.importorskip("transformers")
    t = qwen2_style_folder(tmp_path)
    tok = Tokenizer(str(tmp_path))
    assert not tok.add_bos and tok.bos_id is None and tok.eos_id == t.token_to_id("<|im_end|>")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = PARITY_TEXTS + hh_texts(100) + ["e\u0301te\u0301 vs \u00e9t\u00e9: NFC composes both", "2024-12-02 3141592653"]
    assert_parity(tok, hf, [x for x in texts if x != "a\u0301 combining" and "e\u0301" not in x])
    for x in texts:   # NFC changes a decomposed accent, so only the ids (not the round trip) can match there
        assert tok.encode(x) == hf(x)["input_ids"], x
    assert len(tok.encode("2024")) == 4                                           # \p{N}: a digit a word
    messages = [{"role": "user", "content": "日本語? 😀"}, {"role": "assistant", "content": "Oui, très bien."}]
    text = tok.apply_chat_template(messages, False)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    assert tok.encode(text, bos=True) == hf(text)["input_ids"]


def test_sentencepiece_model_saved_by_transformers_as_tokenizer_json(tmp_path, stories):
    """transformers 5 saves a SentencePiece model as tokenizer.json alone (Metaspace, byte fallback): it loads, gives
    transformers' ids, and the SentencePiece ids wherever transformers' conversion agrees with SentencePiece."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    transformers.AutoTokenizer.from_pretrained(STORIES).save_pretrained(str(tmp_path))
    assert "tokenizer.json" in os.listdir(tmp_path) and "tokenizer.model" not in os.listdir(tmp_path)
    tok, sp = Tokenizer(str(tmp_path)), stories[1]
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == ("bpe", 512, 1, 2, True)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_parity(tok, hf, PARITY_TEXTS + hh_texts(200), roundtrip=False)
    for t in ["Once upon a time, there was a cat named Tom.", "\n\nHuman: Hi! 日本 😀\n\nAssistant: Hello."]:
        assert tok.encode(t) == sp.encode(t)


CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?  "}]


@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_chat_templates_render_as_transformers(which, tmp_path, request):
    """The chat template, rendered by hand with jinja2, equals transformers' apply_chat_template: text and ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from tokenizer import dialogue_ids, format_dialogue
    if which == "smollm2":
        folder = request.getfixturevalue("smollm2_tokenizer")
    else:
        llama3_style_folder(tmp_path)
        folder = str(tmp_path)
    tok, hf = Tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.encode(ours, bos=False) == hf(ours, add_special_tokens=False)["input_ids"]
    # THE dialogue helper: the paper's text parsed into turns, rendered by the template
    prompt = "\n\nHuman: Hi! What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?"
    stripped = [{**m, "content": m["content"].strip()} for m in CONVERSATION[1:]]      # turns are stripped
    want = hf.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
    assert format_dialogue(prompt, chat=tok) == want
    assert dialogue_ids(tok, prompt, chat=True) == hf(want, add_special_tokens=False)["input_ids"]
    ids = dialogue_ids(tok, prompt, "6.", chat=True)
    assert ids[-1] == tok.eos_id and tok.decode(ids).endswith("6." + tok.decode([tok.eos_id]))


def test_unsupported_and_missing_tokenizers(tmp_path):
    from model import UserError
    with pytest.raises(UserError, match="no tokenizer.model"):
        Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(UserError, match="only BPE"):
        Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe binary")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer(str(tmp_path))


def test_checkpoints_carry_complete_tokenizer_files(tmp_path, stories):
    """A policy checkpoint and a reward-model checkpoint: transformers' AutoTokenizer gives our ids (BOS included), a
    pad token, and the reward model's pad is not its EOS."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")            # transformers converts a tokenizer.model with it
    from rm import RewardModel
    model, tok = stories
    model.save_pretrained(str(tmp_path / "policy"), files=tok.files())
    RewardModel.from_pretrained(STORIES).save_pretrained(str(tmp_path / "rm"))
    for name in ("policy", "rm"):
        d = tmp_path / name
        assert {"tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(d))
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        for t in ["Once upon a time, there was a cat.", "\n\nHuman: Hi!\n\nAssistant: Hello, how are you?"]:
            assert hf(t)["input_ids"] == tok.encode(t, bos=True)
        assert hf.pad_token_id is not None and hf.pad_token_id != tok.eos_id
    cfg = json.load(open(tmp_path / "rm" / "config.json"))
    assert cfg["pad_token_id"] == transformers.AutoTokenizer.from_pretrained(str(tmp_path / "rm")).pad_token_id


def test_chat_template_mistakes_end_in_one_message(tmp_path, stories, smollm2_tokenizer):
    import shutil
    from model import UserError
    pytest.importorskip("jinja2")
    with pytest.raises(UserError, match="no chat template"):
        stories[1].apply_chat_template([{"role": "user", "content": "hi"}])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smollm2_tokenizer, f), tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")
    tok = Tokenizer(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(UserError, match="refused a dialogue.*no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])


# -----------------------------------------------------------------------------
# the bundled SentencePiece tokenizer, and the authors' post-processing

def test_tokenizer(stories):
    _, tok = stories
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    ids = tok.encode("Lily saw a dog.", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.encode("Lily saw a dog.", bos=False) == ids[1:-1]
    assert tok.decode(ids) == "Lily saw a dog."
    assert Tokenizer(os.path.join(STORIES, "tokenizer.model")).encode("hi") == tok.encode("hi")


def test_postprocess_response():
    assert postprocess_response(" Sure, here it is.\n\nHuman: thanks") == "Sure, here it is."
    assert postprocess_response(" An answer.\n\n-----\n\nHuman: next") == "An answer."
    assert postprocess_response(" First.\n\nAssistant: again") == "First."


def test_postprocess_cuts_only_at_a_demonstration_break():
    assert postprocess_response(" Use -----  as a divider.\n\n-----\n\nHuman: next") == "Use -----  as a divider."
    assert postprocess_response("\n A tab stays\t\n\n") == "A tab stays\t"
