"""Offline prompt tokenizers: fixed-length token ids and a mask, as π0 feeds its prefix.

Both follow openpi's PaligemmaTokenizer: the prompt is stripped, '_' and newlines become spaces, then
[bos] + tokens(prompt) + tokens("\\n"); padded with 0 (mask False) or truncated to `max_len`.
Nothing is ever downloaded: the byte tokenizer needs no files, the PaliGemma one reads a local file.
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np

from coop_transport.policy.config import BYTE_VOCAB_SIZE, Pi0Config

# File names the PaliGemma tokenizer may have in a weights directory: HF's tokenizers JSON (LeRobot,
# google/paligemma-3b-*), or the SentencePiece model openpi uses (big_vision's paligemma_tokenizer.model).
PALIGEMMA_TOKENIZER_FILES = ("tokenizer.json", "paligemma_tokenizer.model", "tokenizer.model")


def _clean(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


class _FixedLength:
    """Shared padding / truncation; subclasses provide `ids(prompt) -> list[int]`."""

    max_len: int

    def ids(self, prompt: str) -> list[int]:
        raise NotImplementedError

    def encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(max_len,) int64 token ids, (max_len,) bool mask (True for real tokens)."""
        ids = self.ids(prompt)
        if len(ids) > self.max_len:
            warnings.warn(f"prompt of {len(ids)} tokens truncated to {self.max_len}: {prompt!r}", stacklevel=2)
            ids = ids[: self.max_len]
        tokens = np.zeros(self.max_len, dtype=np.int64)
        tokens[: len(ids)] = ids
        mask = np.zeros(self.max_len, dtype=bool)
        mask[: len(ids)] = True
        return tokens, mask

    def encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, max_len) int64 token ids, (B, max_len) bool mask."""
        pairs = [self.encode(p) for p in prompts]
        return np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs])


class ByteTokenizer(_FixedLength):
    """UTF-8 bytes as tokens: 0 pad, 1 bos, 2 eos, byte b -> b + 3. Vocabulary of 259, no files."""

    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, max_len: int):
        self.max_len = max_len

    def ids(self, prompt: str) -> list[int]:
        return [self.BOS] + [b + self.OFFSET for b in (_clean(prompt) + "\n").encode("utf-8")]

    def decode(self, tokens) -> str:
        return bytes(int(t) - self.OFFSET for t in tokens if int(t) >= self.OFFSET).decode("utf-8", errors="replace")


class PaliGemmaTokenizer(_FixedLength):
    """PaliGemma's SentencePiece vocabulary (257,152 tokens) read from a local file; never downloads."""

    def __init__(self, path: str | pathlib.Path, max_len: int):
        self.max_len = max_len
        path = pathlib.Path(path)
        if path.suffix == ".json":
            from tokenizers import Tokenizer  # transformers' own dependency

            tokenizer = Tokenizer.from_file(str(path))
            self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
            self.bos_id = tokenizer.token_to_id("<bos>")
        else:
            try:
                import sentencepiece
            except ImportError as error:
                raise ImportError(
                    f"{path} is a SentencePiece model and the 'sentencepiece' package is not installed; "
                    "install it or provide PaliGemma's tokenizer.json instead"
                ) from error
            processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._encode = lambda text: processor.encode(text)
            self.bos_id = processor.bos_id()
        if self.bos_id is None or self.bos_id < 0:
            raise ValueError(f"{path} defines no <bos> token; is it PaliGemma's tokenizer?")

    def ids(self, prompt: str) -> list[int]:
        return [self.bos_id] + list(self._encode(_clean(prompt))) + list(self._encode("\n"))


def find_paligemma_tokenizer(weights_dir: str | pathlib.Path) -> pathlib.Path:
    """The PaliGemma tokenizer file inside a local weights directory (searched one level deep)."""
    weights_dir = pathlib.Path(weights_dir)
    for name in PALIGEMMA_TOKENIZER_FILES:
        for candidate in (weights_dir / name, *sorted(weights_dir.glob(f"*/{name}"))):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"no PaliGemma tokenizer ({', '.join(PALIGEMMA_TOKENIZER_FILES)}) in {weights_dir}; pi0-3b prompts need the "
        "tokenizer file that came with the π0 / PaliGemma weights (nothing is downloaded)"
    )


def make_tokenizer(config: Pi0Config, weights_dir: str | pathlib.Path | None = None) -> _FixedLength:
    """The config's tokenizer: bytes (no files) or PaliGemma's, read from `weights_dir`."""
    if config.tokenizer == "bytes":
        return ByteTokenizer(config.max_token_len)
    if weights_dir is None:
        raise FileNotFoundError(
            f"config {config.name!r} tokenizes prompts with PaliGemma's tokenizer: pass the local weights directory "
            "that holds it (nothing is downloaded)"
        )
    return PaliGemmaTokenizer(find_paligemma_tokenizer(weights_dir), config.max_token_len)
