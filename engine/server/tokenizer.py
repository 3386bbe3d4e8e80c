"""Text in, token ids out, and back: the server's tokenizer, built offline for the presets.

The presets have random weights and no tokenizer of their own, so the project builds one: a
byte-level BPE (any text encodes, nothing is unknown) trained with the `tokenizers` library on a
short corpus shipped beside this file, then padded with extra merges until it has exactly the
model's `vocab_size` entries. Exactly, because a random model emits any id up to its vocabulary:
each must decode to text. The build is deterministic, so the files `python -m engine tokenizer`
writes match what `serve` uses. A checkpoint directory with its own `tokenizer.json` uses that.

Files are Hugging Face's (`tokenizer.json`, `tokenizer_config.json` with the chat template), so
`transformers.AutoTokenizer`, GuideLLM and other clients load them from a local directory.
The engine itself never sees text: only the server's HTTP side calls this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.config import ConfigError, ModelConfig

CORPUS = Path(__file__).with_name("corpus.txt")
EOS = "<|endoftext|>"
SPECIALS = (EOS, "<|system|>", "<|user|>", "<|assistant|>")  # ids 0-3
# Role markers, each message closed by EOS; the model is random, so the template only has to be
# simple, stable and loadable by transformers' `apply_chat_template`.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_PAD_CHARS = "etaoinshrdlucmfwypvbgkjqxz"  # right-hand sides of padding merges, in a fixed order


@dataclass
class TextCodec:
    """A loaded tokenizer with what the server needs around it."""

    tokenizer: Tokenizer
    eos_token_id: int | None
    chat_template: str
    files: dict[str, str]  # file name -> contents, for `python -m engine tokenizer --out`

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat, made by the same template clients read from the files."""
        template = ImmutableSandboxedEnvironment().from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=True, eos_token=EOS)


def _train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer=trainer)
    return tok


def _pad(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """Add merges (existing token + letter) in a fixed order until the vocabulary is full."""
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges: list = spec["model"]["merges"]
    size = len(vocab) + sum(t["content"] not in vocab for t in spec["added_tokens"])
    lefts = [t for t in sorted(vocab, key=vocab.get) if t not in SPECIALS]
    for left in lefts:  # grows as it goes: a new token is the left side of later merges
        for right in _PAD_CHARS:
            if size >= vocab_size:
                return Tokenizer.from_str(json.dumps(spec))
            if left + right in vocab:
                continue
            vocab[left + right] = size
            merges.append([left, right])
            lefts.append(left + right)
            size += 1
    return Tokenizer.from_str(json.dumps(spec))


@lru_cache(maxsize=4)
def built(vocab_size: int, max_len: int) -> TextCodec:
    """The project's tokenizer for a model of `vocab_size` ids (cached: a build takes a moment)."""
    if vocab_size < 256 + len(SPECIALS):
        raise ConfigError(f"a byte-level tokenizer needs a vocabulary of at least "
                          f"{256 + len(SPECIALS)} ids; the model has {vocab_size}")
    tok = _pad(_train(vocab_size), vocab_size)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
              "bos_token": None, "unk_token": None, "pad_token": EOS,
              "model_max_length": max_len, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    return TextCodec(tok, tok.token_to_id(EOS), CHAT_TEMPLATE,
                     {"tokenizer.json": tok.to_str(pretty=False),
                      "tokenizer_config.json": json.dumps(config, indent=2)})


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def from_checkpoint(path: Path) -> TextCodec:
    """A checkpoint's own tokenizer files: tokenizer.json plus, when present, its config."""
    files = {p.name: p.read_text() for p in (path / "tokenizer.json",
                                              path / "tokenizer_config.json") if p.is_file()}
    try:
        tok = Tokenizer.from_str(files["tokenizer.json"])
        config = json.loads(files.get("tokenizer_config.json", "{}"))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ConfigError(f"{path}: cannot read the tokenizer ({err})") from None
    eos = _token_text(config.get("eos_token")) if isinstance(config, dict) else None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return TextCodec(tok, tok.token_to_id(eos) if eos else None,
                     template if isinstance(template, str) else CHAT_TEMPLATE, files)


def for_model(model: str, config: ModelConfig) -> TextCodec:
    """A checkpoint directory's own tokenizer if it has one, else the project's for its size."""
    path = Path(model)
    if (path / "tokenizer.json").is_file():
        return from_checkpoint(path)
    return built(config.vocab_size, config.max_position_embeddings)


def write(codec: TextCodec, out: Path) -> list[Path]:
    """Write the files a client needs to load this tokenizer from a local directory."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in codec.files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written
