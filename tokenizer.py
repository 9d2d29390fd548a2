"""
Text to token ids and back: THE Tokenizer class, and THE dialogue format every stage writes its prompts in and reads
its answers from.

The paper's dialogue format (the authors' prompts, the static HHH set, Anthropic HH) is plain text:

    "\\n\\nHuman: {query}\\n\\nAssistant: {response}\\n\\nHuman: ...\\n\\nAssistant:"

A policy continues the text after the last "Assistant:"; what it writes up to the next turn is its answer.
"""
import os

from common import UserError


class Tokenizer:
    """SentencePiece tokenizer: a tokenizer.model file, or a model folder holding one."""

    def __init__(self, path):
        import sentencepiece as spm
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise UserError(f"{file}: missing. Copy the checkpoint's SentencePiece tokenizer.model there.")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(file)
        except Exception:
            raise UserError(f"{file}: not a SentencePiece model. Use the tokenizer.model that came with "
                            f"the checkpoint.") from None
        self.path = file
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text, bos=True, eos=False):
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def save(self, path):
        """Write the SentencePiece model to `path` (a checkpoint's tokenizer.model)."""
        with open(path, "wb") as f:
            f.write(self.sp.serialized_model_proto())


# -----------------------------------------------------------------------------
# the dialogue format

def format_dialogue(prompt, response=None):
    """THE prompt format. A plain query becomes "\\n\\nHuman: {query}"; a prompt that already is a dialogue
    ("\\n\\nHuman: ... \\n\\nAssistant: ... \\n\\nHuman: ...") is kept. Then "\\n\\nAssistant:" and, if given,
    " {response}". Without a response this is the text a policy continues."""
    p = prompt if prompt.lstrip(" ").startswith("\n\nHuman:") else "\n\nHuman: " + prompt.strip()
    p = p.rstrip()
    return p + "\n\nAssistant:" + ("" if response is None else " " + response.strip())


def dialogue_text(turns):
    """[(role, text), ...] with roles "user" / "assistant" -> "\\n\\nHuman: ...\\n\\nAssistant: ..." in the same
    format as format_dialogue (which takes this text as its prompt for the next answer)."""
    return "".join(("\n\nHuman: " if role == "user" else "\n\nAssistant: ") + text.strip() for role, text in turns)


def split_dialogue(text):
    """An Anthropic HH dialogue -> (prompt, response), split at the last "\\n\\nAssistant:"."""
    i = text.rfind("\n\nAssistant:")
    if i < 0:
        return None
    return text[:i], text[i + len("\n\nAssistant:"):].strip()


def postprocess_response(text):
    """A model's continuation of a dialogue -> the assistant's turn (ALMoST step 1b's post-processing): cut at the
    next "-----" (the end of a demonstration), then before the next "Assistant:", then before the next "Human:";
    strip."""
    text = text.split("-----")[0]
    text = text.split("Assistant:")[0]
    text = text.split("Human:")[0]
    return text.strip()
