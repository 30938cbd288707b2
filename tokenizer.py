"""Chat tokenization for OLA-VLM (Sec. 5.1; docs/design.md §5): a `tokenizer.json` plus the llama3 / phi3
LLaVA chat templates -> (input_ids, labels) with the labels checked against the answers, and the tiny
Llama-3-style BPE that the built-in data trains."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

IMAGE_TOKEN = "<image>"  # the placeholder in LLaVA records
IMAGE_TOKEN_INDEX = -200  # its id in input_ids, which the model replaces by the image + special tokens
IGNORE_INDEX = -100  # labels of positions without a next-token loss


# ----------------------------------------------------------------------------- 1. chat templates
@dataclass(frozen=True)
class ChatTemplate:
    """MPT-style LLaVA template: prompt = system + sep + Σ(role + message + sep) (docs/design.md §5)."""

    system: str
    user: str
    assistant: str
    sep: str  # end-of-turn token, a label target after every answer
    end_of_text: str  # the tokenizer's end-of-text token: second stop id, and the pad id
    bos: str | None = None  # a conversation starts with exactly this token, whatever the post-processor adds
    labelled_header: str = ""  # the end of `assistant` labelled with each answer (docs/design.md §5)


TEMPLATES = {
    "llama3": ChatTemplate(
        system=(
            "<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
            "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
            "questions."
        ),
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        sep="<|eot_id|>",
        end_of_text="<|end_of_text|>",
        bos="<|begin_of_text|>",
        labelled_header="\n\n",  # the released preprocess_llama_3 leaves the header's last token unmasked
    ),
    "phi3": ChatTemplate(
        system="<|system|>\nYou are a helpful AI assistant.",
        user="\n<|user|>\n",
        assistant="\n<|assistant|>\n",
        sep="<|end|>",
        end_of_text="<|endoftext|>",
    ),
}


class LabelMismatchError(RuntimeError):
    """The labelled tokens of a sample do not decode to its answers + end-of-turn tokens."""


class ChatTokenizer:
    """A `tokenizer.json` and a chat template (docs/design.md §5). `bos_ids`: what the post-processor prepends
    (Llama-3: `<|begin_of_text|>`); `eos_ids` = (end-of-turn, end-of-text) stop generation; `pad_id` =
    end-of-text, as Llama-3 has no pad token (padded positions are masked; the released code adds a
    `<pad>` row instead)."""

    def __init__(self, path: str | os.PathLike, template: str = "llama3"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected a tokenizer.json)")
        self.path = str(path)
        self.name = template
        self.template = TEMPLATES[template]
        try:
            self.tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the tokenizers library raises its own error type for a malformed file
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        t = self.template
        specials_text = t.system + t.user + t.assistant + t.sep + t.end_of_text + (t.bos or "")
        for special in re.findall(r"<\|[^|]+\|>", specials_text):
            if self.encode(special) != [self.tok.token_to_id(special)]:
                raise ValueError(
                    f"{self.path}: template {template!r} needs {special!r} as a single "
                    f"special token, but the tokenizer encodes it as {self.encode(special)}"
                )
        self.sep_id = self.tok.token_to_id(t.sep)
        self.pad_id = self.tok.token_to_id(t.end_of_text)
        self.eos_ids = (self.sep_id, self.pad_id)
        added = self.tok.encode("").ids  # what the post-processor prepends
        if self.tok.encode("a").ids != added + self.encode("a"):
            raise ValueError(
                f"{self.path}: the post-processor must only prepend tokens (a BOS), "
                f"got {self.tok.encode('a').tokens} for 'a'"
            )
        # Llama-3: the April-2024 tokenizer.json prepends no <|begin_of_text|>, later revisions do; the model
        # expects exactly one either way
        self.bos_ids = [self.tok.token_to_id(t.bos)] if t.bos else added
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, special tokens in the text matched, nothing added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the image placeholder: 38 for Llama-3 (the released NUM_SYS_TOKENS), 11 for Phi-3's
        tokenizer.json (the released code's slow tokenizer: 13; docs/design.md §5)."""
        return self.encode_conversation([{"from": "human", "value": "x"}], with_image=True)[0].index(
            IMAGE_TOKEN_INDEX
        )

    def encode_conversation(
        self, conversations: list, with_image: bool, sample_id: str = "?"
    ) -> tuple[list[int], list[int]]:
        """LLaVA conversations [{"from": "human"|"gpt", "value": str}, ...] -> (input_ids, labels).

        With an image, `<image>` is moved to the front of its turn (inserted into the first one when the
        text has none); the other turns stay as written, as in the released code (docs/design.md §5).
        input_ids follow LLaVA's `tokenizer_image_token`: chunks between `<image>`s are encoded separately,
        joined by IMAGE_TOKEN_INDEX, BOS kept once. A token is a label iff it starts inside labelled_header
        + answer + sep (character offsets), and each answer's labels must decode to exactly that text, else
        LabelMismatchError. A trailing human turn ends with the assistant header.
        """
        if not isinstance(conversations, list) or not conversations:
            raise ValueError(f"'conversations' must be a non-empty list, got {conversations!r:.60}")
        for k, turn in enumerate(conversations):
            role = ("human", "gpt")[k % 2]
            if (
                not isinstance(turn, dict)
                or turn.get("from") != role
                or not isinstance(turn.get("value"), str)
            ):
                raise ValueError(f"turn {k}: expected {{'from': '{role}', 'value': str}}, got {turn!r:.80}")
        messages = [turn["value"] for turn in conversations]
        n_images = sum(m.count(IMAGE_TOKEN) for m in messages)
        if not with_image and n_images:
            raise ValueError(f"'{IMAGE_TOKEN}' in the text but the record has no 'image'")
        if n_images > 1:
            raise ValueError(f"{n_images} '{IMAGE_TOKEN}' placeholders; one image per sample is supported")
        # as the released preprocess_multimodal: the turn with the image becomes "<image>\n" + its text,
        # stripped; every other turn stays as written (a text-only record's first turn gets the image)
        if with_image:
            k = next((k for k, m in enumerate(messages) if IMAGE_TOKEN in m), 0)
            messages[k] = (IMAGE_TOKEN + "\n" + messages[k].replace(IMAGE_TOKEN, "").strip()).strip()
        t = self.template
        # spans: character ranges of the answers + their sep (and the labelled end of the header before them)
        text = t.system + t.sep
        spans = []
        for k, message in enumerate(messages):
            if k % 2:
                spans.append((len(text) - len(t.labelled_header), len(text) + len(message + t.sep)))
                text += message + t.sep
            else:
                text += t.user + message + t.sep + t.assistant
        # starts: char offset per token
        ids = list(self.bos_ids)
        starts = [-1] * len(self.bos_ids)
        pos = 0
        for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
            enc = self.tok.encode(chunk, add_special_tokens=False)
            ids += ([IMAGE_TOKEN_INDEX] if k else []) + enc.ids
            starts += ([-1] if k else []) + [pos + a for a, _ in enc.offsets]
            pos += len(chunk) + len(IMAGE_TOKEN)
        labels = [IGNORE_INDEX] * len(ids)
        for n, (a, b) in enumerate(spans):
            inside = [j for j, s in enumerate(starts) if a <= s < b]
            for j in inside:
                labels[j] = ids[j]
            got = self.decode([ids[j] for j in inside], skip_special_tokens=False)
            # a right-stripping special token (Phi-3's <|assistant|>) swallows an answer's leading whitespace
            if got not in (text[a:b], text[a:b].lstrip()) or not inside or ids[inside[-1]] != self.sep_id:
                raise LabelMismatchError(
                    f"sample {sample_id}: the labelled tokens of answer {n} decode to {got!r}, "
                    f"expected {text[a:b]!r} (tokenizer {self.path}, template {self.name})"
                )
        return ids, labels


def find_tokenizer(explicit: str | os.PathLike | None, folder, llm_folder) -> Path | None:
    """The tokenizer.json of a model: `explicit` (--tokenizer), else the checkpoint folder's own (released
    folders ship one), else that of the folder the LLM came from; None when there is neither."""
    if explicit:
        return Path(explicit)
    if folder and (Path(folder) / "tokenizer.json").is_file():
        return Path(folder) / "tokenizer.json"
    if llm_folder:
        return Path(llm_folder) / "tokenizer.json"
    return None


def check_vocabulary(tok: ChatTokenizer, rows: int) -> None:
    """Every token id must index a row of the LLM's embedding (else an index error deep in the model)."""
    if tok.vocab_size > rows:
        raise ValueError(
            f"{tok.path}: {tok.vocab_size} tokens, but the LLM's embedding has {rows} rows "
            f"(config.json vocab_size): use the tokenizer.json that came with the LLM (--tokenizer)"
        )


# ----------------------------------------------------------------------------- 2. tiny tokenizer
LLAMA3_CHAT_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(4)),
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Train a Llama-3-style byte-level BPE on `texts`, deterministically, and save it as `path`
    (docs/design.md §5): Llama-3 split regex + ByteLevel, the first 10 Llama-3 special tokens, a BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(LLAMA3_CHAT_TOKENS),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bos = LLAMA3_CHAT_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tok.save(str(path))
    return Path(path)


# ----------------------------------------------------------------------------- 3. built-in data
