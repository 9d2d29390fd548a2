"""
Text to token ids and back: THE Tokenizer class, and THE dialogue format every stage writes its prompts in and reads
its answers from.

Two kinds of tokenizer files load: SentencePiece's tokenizer.model (LLaMA 1 and 2, the bundled story models) and the
tokenizer.json of Hugging Face's `tokenizers` with a BPE model, byte-level (GPT-2, Llama-3, Qwen, SmolLM2) or
SentencePiece-style (what transformers 5 writes for LLaMA 2), read and run here by hand (class BPE): the
pre-tokenizer splits the text into words, each written in the vocabulary's alphabet, and the merges join them by
rank. tokenizer_config.json says which tokens are BOS, EOS and pad
and whether BOS starts a text. Checkpoints this project writes carry these files (`Tokenizer.files`).

The paper's dialogue format (the authors' prompts, the static HHH set, Anthropic HH) is plain text:

    "\\n\\nHuman: {query}\\n\\nAssistant: {response}\\n\\nHuman: ...\\n\\nAssistant:"

A policy continues the text after the last "Assistant:"; what it writes up to the next turn is its answer.
"""
import datetime
import functools
import json
import math
import os
import re
import shutil
import sys
import unicodedata

from common import UserError, read_json, read_text, write_json


class Tokenizer:
    """THE tokenizer of a model folder: SentencePiece (tokenizer.model, LLaMA 1 and 2) or BPE (tokenizer.json:
    Llama-3, SmolLM2, Qwen, GPT-2, or LLaMA 2 as transformers 5 saves it), with the special tokens and the add-BOS
    setting of tokenizer_config.json. `path` is the folder (or a tokenizer.model file)."""

    def __init__(self, path):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        sp_file = path if os.path.isfile(path) else os.path.join(folder, "tokenizer.model")
        json_file = os.path.join(folder, "tokenizer.json")
        cfg_file = os.path.join(folder, "tokenizer_config.json")
        self.config = read_json(cfg_file) if os.path.isfile(cfg_file) and os.path.isdir(path) else {}
        if os.path.isfile(sp_file):
            self.load_sentencepiece(sp_file)
        elif os.path.isfile(json_file):
            self.load_bpe(json_file)
        else:
            raise UserError(f"{folder}: no tokenizer.model (SentencePiece) and no tokenizer.json (BPE). Copy the "
                            f"checkpoint's tokenizer files there.")
        pad = token_text(self.config.get("pad_token"))
        self.pad_id = self.token_id(pad) if pad else None
        template = os.path.join(folder, "chat_template.jinja")
        self.chat_template = read_text(template) if os.path.isfile(template) else \
            self.config.get("chat_template")
        if isinstance(self.chat_template, list):   # named templates: the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)

    def load_sentencepiece(self, file):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(file)
        except Exception:
            raise UserError(f"{file}: not a SentencePiece model. Use the tokenizer.model that came with "
                            f"the checkpoint.") from None
        self.kind, self.path, self.bpe = "sentencepiece", file, None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.add_bos = bool(self.config.get("add_bos_token", True))

    def load_bpe(self, file):
        try:
            spec = read_json(file)
        except UnicodeDecodeError:
            raise UserError(f"{file}: not a tokenizer.json (not UTF-8 text).") from None
        self.kind, self.path, self.sp = "bpe", file, None
        self.bpe = BPE(spec, file)
        self.vocab_size = max(self.bpe.id_to_piece) + 1
        self.bos_id = self.token_id(token_text(self.config.get("bos_token")))
        self.eos_id = self.token_id(token_text(self.config.get("eos_token")))
        if "add_bos_token" in self.config:
            self.add_bos = bool(self.config["add_bos_token"])
        else:   # transformers adds what the post-processor's template puts before the text
            first = template_prefix(spec.get("post_processor"))
            self.add_bos = first is not None
            if first is not None:
                self.bos_id = self.token_id(first)
        if self.eos_id is None:
            raise UserError(f"{file}: tokenizer_config.json names no eos_token. Copy the checkpoint's "
                            f"tokenizer_config.json beside tokenizer.json.")

    def token_id(self, text):
        if text is None:
            return None
        if self.sp is not None:
            i = self.sp.piece_to_id(text)
            return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i
        return self.bpe.added.get(text, self.bpe.vocab.get(text))

    def encode(self, text, bos=True, eos=False):
        """Token ids of `text`; bos=True starts them with BOS where the tokenizer adds one (LLaMA's does, SmolLM2's
        does not); eos=True appends EOS. Special tokens written in the text (a chat template's) are their ids."""
        if self.sp is not None:
            specials = [self.sp.id_to_piece(i) for i in (self.bos_id, self.eos_id) if i is not None and i >= 0]
            parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
            ids = [i for p in parts if p for i in ([self.sp.piece_to_id(p)] if p in specials else self.sp.encode(p))]
        else:
            ids = self.bpe.encode(text)
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """[{"role", "content"}, ...] rendered by the model folder's chat template exactly as transformers'
        apply_chat_template renders it (jinja2 in a sandbox; jinja2 is needed for this alone)."""
        if not self.chat_template:
            raise UserError(f"{os.path.dirname(self.path)}: no chat template (chat_template.jinja or a "
                            f"\"chat_template\" in tokenizer_config.json). Leave --chat_template off to use the paper's "
                            f"Human/Assistant format.")
        try:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise UserError("--chat_template needs jinja2: pip install jinja2") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        specials = {k: token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        specials.update(bos_token=self.id_to_piece(self.bos_id) if self.bos_id is not None else specials["bos_token"],
                        eos_token=self.id_to_piece(self.eos_id))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **{k: v for k, v in specials.items() if v is not None})
        except jinja2.TemplateError as e:
            raise UserError(f"{os.path.dirname(self.path)}: the chat template refused a dialogue ({e}).") from None

    def decode(self, ids):
        """The text of ids. An id past the tokenizer's pieces (a vocabulary padded beyond them, as Qwen's is, can
        sample one) has no text."""
        if self.sp is not None:
            return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])
        return self.bpe.decode(ids)

    def files(self, pad_id=None):
        """{file name: writer(path)} of this tokenizer in a checkpoint folder: tokenizer.model or tokenizer.json,
        tokenizer_config.json (BOS, EOS, pad, whether BOS is added) and the chat template if the folder had one.
        pad_id: the checkpoint's pad token, if it differs from the tokenizer's (a reward model's is not EOS)."""
        pad_id = self.pad_id if pad_id is None else pad_id
        if pad_id is None and 0 not in (self.bos_id, self.eos_id):
            pad_id = 0                                  # a token no text ends with (<unk> for LLaMA's SentencePiece)
        cfg = dict(self.config)
        if self.sp is not None:
            cfg.setdefault("tokenizer_class", "LlamaTokenizer")
            cfg.setdefault("legacy", True)
            cfg.setdefault("clean_up_tokenization_spaces", False)
        piece = lambda i: None if i is None else self.id_to_piece(i)
        cfg.update(bos_token=piece(self.bos_id), eos_token=piece(self.eos_id), pad_token=piece(pad_id),
                   add_bos_token=self.add_bos, add_eos_token=False)
        out = {"tokenizer_config.json": lambda f: write_json(f, cfg)}
        if self.sp is not None:
            out["tokenizer.model"] = self.save
        else:
            out["tokenizer.json"] = lambda f: shutil.copyfile(self.path, f)
        template = os.path.join(os.path.dirname(self.path), "chat_template.jinja")
        if os.path.isfile(template):
            out["chat_template.jinja"] = lambda f: shutil.copyfile(template, f)
        return out

    def same_as(self, other):
        """Whether two tokenizers give every text the same ids (same kind, vocabulary and merges)."""
        if self.kind != other.kind or self.vocab_size != other.vocab_size:
            return False
        if self.sp is not None:
            return self.sp.serialized_model_proto() == other.sp.serialized_model_proto()
        return (self.bpe.vocab, self.bpe.ranks, self.bpe.added) == (other.bpe.vocab, other.bpe.ranks, other.bpe.added)

    def id_to_piece(self, i):
        return self.sp.id_to_piece(i) if self.sp is not None else self.bpe.id_to_piece[i]

    def save(self, path):
        """Write the SentencePiece model to `path` (a checkpoint's tokenizer.model)."""
        with open(path, "wb") as f:
            f.write(self.sp.serialized_model_proto())


def has_tokenizer(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.model", "tokenizer.json"))


def token_text(entry):
    """A special token as tokenizer_config.json gives it (a string, or a dict with "content") -> its text."""
    return entry.get("content") if isinstance(entry, dict) else entry


def template_prefix(post):
    """The special token a tokenizer.json post-processor puts before a single text (Llama-3's <|begin_of_text|>),
    or None."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        return next((t for p in post.get("processors", []) if (t := template_prefix(p))), None)
    if post.get("type") == "TemplateProcessing" and post.get("single"):
        first = post["single"][0]
        return first["SpecialToken"]["id"] if "SpecialToken" in first else None
    return None


# -----------------------------------------------------------------------------
# byte-level BPE (tokenizer.json), as GPT-2, Llama-3, Qwen and SmolLM2 write it

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters: bytes that print stay themselves, the others
    (control characters, space, ...) become 256 + n. A BPE vocabulary is written in these characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


@functools.lru_cache(maxsize=None)
def unicode_class(prefix):
    """The code point ranges (for a regex character class) of the Unicode categories starting with `prefix`:
    "L" letters, "N" numbers. Python's re has no \\p{...}, so the pre-tokenizer patterns get these instead."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    esc = lambda c: "\\U%08x" % c
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


def translate_pattern(pattern):
    """A pre-tokenizer regex of the Rust `regex` crate -> Python's re: \\p{L} and \\p{N} become code point ranges
    (inside a character class, or as one)."""
    out, i, depth = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and pattern[i + 1] == "p" and pattern[i + 2] == "{":
            j = pattern.index("}", i)
            cls = unicode_class(pattern[i + 3:j])
            out.append(cls if depth else f"[{cls}]")
            i = j + 1
            continue
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        out.append(c)
        i += 1
    return re.compile("".join(out))


class BPE:
    """BPE from a tokenizer.json. Added tokens are matched first. Byte-level (GPT-2, Llama-3, Qwen, SmolLM2): the
    pre-tokenizer's regex splits the text into words and each word's UTF-8 bytes are written in GPT-2's byte
    characters. SentencePiece-style (what transformers writes for LLaMA 1 and 2): spaces become "▁", one is
    prepended, and a character the vocabulary lacks falls back to its bytes, <0xXX>. Then the merges join the
    pieces of each word in rank order (lowest first) until none applies."""

    def __init__(self, spec, where):
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise UserError(f"{where}: a {model.get('type')!r} tokenizer; only BPE tokenizer.json files (GPT-2, "
                            f"Llama-3, Qwen, SmolLM style) and SentencePiece tokenizer.model files are supported.")
        self.vocab = model["vocab"]                                            # {piece: id}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.ignore_merges = bool(model.get("ignore_merges"))
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.unk = self.vocab.get(model.get("unk_token"))
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.normalizers = self.steps(spec.get("normalizer"), "normalizers")
        self.byte_level, self.metaspace, self.split, self.digits = False, None, None, False
        for step in self.steps(spec.get("pre_tokenizer"), "pretokenizers"):
            self.pre_tokenizer(step, where)
        for step in self.normalizers:
            if step["type"] not in ("Prepend", "Replace", "NFC") or \
                    step["type"] == "Replace" and "String" not in step["pattern"]:
                raise UserError(f"{where}: normalizer {step['type']!r} is not supported (Prepend, Replace, NFC are).")
        # SentencePiece written as BPE: spaces became "▁" (Metaspace, or the normalizers Prepend and Replace)
        self.sp_style = bool(self.metaspace) or any(s["type"] in ("Prepend", "Replace") for s in self.normalizers)
        self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.id_to_piece = {i: p for p, i in self.vocab.items()}
        self.id_to_piece.update({i: p for p, i in self.added.items()})
        self.added_re = (re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
                         if self.added else None)
        self.cache = {}

    @staticmethod
    def steps(item, key):
        return item.get(key, []) if item and item.get("type") == "Sequence" else [item] if item else []

    def pre_tokenizer(self, s, where):
        if s["type"] == "Split":
            self.split = translate_pattern(s["pattern"].get("Regex") or re.escape(s["pattern"]["String"]))
        elif s["type"] == "ByteLevel":
            self.byte_level = True
            if s.get("use_regex", True):
                self.split = translate_pattern(GPT2_PATTERN)
            if s.get("add_prefix_space"):
                raise UserError(f"{where}: ByteLevel add_prefix_space is not supported.")
        elif s["type"] == "Digits":
            self.digits = bool(s.get("individual_digits"))
        elif s["type"] == "Metaspace":
            self.metaspace = s
        else:
            raise UserError(f"{where}: pre-tokenizer {s['type']!r} is not supported (Split, ByteLevel, Digits, "
                            f"Metaspace are).")

    def words(self, text, first):
        """A stretch of text between added tokens -> its words, each written in the vocabulary's characters."""
        for step in self.normalizers:
            if step["type"] == "Prepend":
                text = step["prepend"] + text if text else text
            elif step["type"] == "Replace":
                text = text.replace(step["pattern"]["String"], step["content"])
            else:
                text = unicodedata.normalize("NFC", text)
        if self.metaspace:
            rep, scheme = self.metaspace["replacement"], self.metaspace.get("prepend_scheme", "always")
            text = text.replace(" ", rep)
            # "▁" goes before the text's first word only (as transformers does, not after an added token)
            if text and not text.startswith(rep) and scheme != "never" and first:
                text = rep + text
            # a SentencePiece vocabulary has no piece that runs across a word boundary: BPE each word alone
            return re.findall(f"{rep}*[^{rep}]+|{rep}+", text) if text else []
        parts = self.split.findall(text) if self.split else [text] if text else []
        if self.digits:
            parts = [p for w in parts for p in re.split(r"(\d)", w) if p]
        if self.byte_level:
            bc = self.byte_char
            parts = ["".join(bc[b] for b in w.encode("utf-8")) for w in parts]
        return parts

    def bpe(self, word):
        """The ids of one word (written in the vocabulary's characters)."""
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        if self.ignore_merges and word in self.vocab:
            parts = [word]
        else:
            parts = list(word)
            while len(parts) > 1:
                rank, i = min((self.ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
                if rank == math.inf:
                    break
                pair, merged, j = (parts[i], parts[i + 1]), [], 0
                while j < len(parts):                      # merge every occurrence, left to right
                    if j < len(parts) - 1 and (parts[j], parts[j + 1]) == pair:
                        merged.append(pair[0] + pair[1])
                        j += 2
                    else:
                        merged.append(parts[j])
                        j += 1
                parts = merged
        ids = []
        for p in parts:
            if p in self.vocab:
                ids.append(self.vocab[p])
            elif self.byte_fallback:                     # a character the vocabulary lacks: its bytes
                ids += [self.vocab[f"<0x{b:02X}>"] for b in p.encode("utf-8")]
            elif self.unk is not None:
                ids.append(self.unk)
            else:
                raise UserError(f"the tokenizer has no piece for {p!r} and no unknown token.")
        if len(self.cache) < 100_000:
            self.cache[word] = ids
        return ids

    def encode(self, text):
        chunks, pos = [], 0
        if self.added_re:
            for m in self.added_re.finditer(text):
                chunks += [text[pos:m.start()], self.added[m.group()]]
                pos = m.end()
        chunks.append(text[pos:])
        ids = []
        for k, chunk in enumerate(chunks):
            if isinstance(chunk, int):
                ids.append(chunk)
            else:
                for w in self.words(chunk, first=k == 0):
                    ids.extend(self.bpe(w))
        return ids

    def decode(self, ids):
        out, cb = bytearray(), self.char_byte
        for i in ids:
            piece = self.id_to_piece.get(int(i), "")
            if piece in self.added:
                out += piece.encode("utf-8")
            elif self.byte_level:
                out += bytes(cb[c] for c in piece)
            elif self.byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(int(piece[3:5], 16))
            else:
                out += piece.encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        if self.sp_style:                                     # SentencePiece style: "▁" back to spaces,
            rep = self.metaspace["replacement"] if self.metaspace else "▁"
            text = text.replace(rep, " ")
            text = text[1:] if text.startswith(" ") else text   # without the space prepended to the first word
        return text


# -----------------------------------------------------------------------------
# the dialogue format

def format_dialogue(prompt, response=None, chat=None):
    """THE prompt format. A plain query becomes "\\n\\nHuman: {query}"; a prompt that already is a dialogue
    ("\\n\\nHuman: ... \\n\\nAssistant: ... \\n\\nHuman: ...") is kept. Then "\\n\\nAssistant:" and, if given,
    " {response}". Without a response this is the text a policy continues.
    chat: a Tokenizer whose chat template renders the same dialogue instead (a chat model's own format)."""
    if chat is not None:
        messages = [{"role": r, "content": t} for r, t in dialogue_turns(prompt)]
        if response is not None:
            messages.append({"role": "assistant", "content": response.strip()})
        return chat.apply_chat_template(messages, add_generation_prompt=response is None)
    p = prompt if "\n\nHuman:" in prompt else "\n\nHuman: " + prompt.strip()
    p = p.rstrip()
    return p + "\n\nAssistant:" + ("" if response is None else " " + response.strip())


def dialogue_text(turns):
    """[(role, text), ...] with roles "user" / "assistant" -> "\\n\\nHuman: ...\\n\\nAssistant: ..." in the same
    format as format_dialogue (which takes this text as its prompt for the next answer)."""
    return "".join(("\n\nHuman: " if role == "user" else "\n\nAssistant: ") + text.strip() for role, text in turns)


def dialogue_turns(prompt):
    """A prompt in the paper's format -> [(role, text)]: a plain query is one user turn; a dialogue is split at its
    role tags, and text before the first "Human:" is a system turn."""
    if "\n\nHuman:" not in prompt:
        return [("user", prompt.strip())]
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    turns = [("system", parts[0].strip())] if parts[0].strip() else []
    return turns + [("user" if tag == "Human" else "assistant", text.strip()) for tag, text in zip(parts[1::2], parts[2::2])]


def dialogue_ids(tok, prompt, response=None, chat=False, bos=True):
    """THE dialogue as token ids: format_dialogue's text in the paper's format (BOS first where the tokenizer adds one
    and `bos`), or with chat=True the model's chat template (which writes its own special tokens). With a response
    the ids end with EOS."""
    if chat:
        text = format_dialogue(prompt, response, chat=tok)
        ids = tok.encode(text.rstrip() if response is not None else text, bos=False)
    else:
        ids = tok.encode(format_dialogue(prompt, response), bos=bos)
    return ids + [tok.eos_id] if response is not None and ids[-1:] != [tok.eos_id] else ids


def messages_text(messages, where="messages"):
    """A conversation as TRL and chat templates write it, [{"role", "content"}, ...] -> the paper's dialogue text;
    a system message becomes a preamble before the first "Human:" turn."""
    turns, system = [], ""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f'{where}: every message needs a "role" (system, user or assistant) and a string "content"')
        if m["role"] == "system":
            system += m["content"].strip()
        else:
            turns.append((m["role"], m["content"]))
    return system + dialogue_text(turns)


def split_dialogue(text):
    """An Anthropic HH dialogue -> (prompt, response), split at the last "\\n\\nAssistant:"."""
    i = text.rfind("\n\nAssistant:")
    if i < 0:
        return None
    return text[:i], text[i + len("\n\nAssistant:"):].strip()


TURN_ENDS = ("\n\n-----", "Assistant:", "Human:")   # where a continuation's assistant turn has ended


def postprocess_response(text):
    """A model's continuation of a dialogue -> the assistant's turn (ALMoST step 1b's post-processing, as the
    authors' code): cut at the next "\n\n-----" (the end of a demonstration), then before the next "Assistant:",
    then before the next "Human:"; strip newlines and spaces. The sampler stops at these strings (TURN_ENDS), so
    nothing is generated past the cut."""
    for end in TURN_ENDS:
        text = text.split(end)[0]
    return text.strip("\n ")


def trim_to_sentence(text):
    """A text cut by a token budget, back to its last sentence that ends in "." or "!" (not inside a quote); unchanged
    when it holds none. The story profile's answers (step 1b), dialogue turns under --trim_cut (step 2) and the story
    PPO rollouts the reward model scores (step 3) go through it."""
    ends = [m.end() for m in re.finditer(r"[.!](?=\s|$)", text)]
    return text[:ends[-1]] if ends else text
