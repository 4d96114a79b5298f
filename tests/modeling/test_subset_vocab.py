from pix2cap.modeling.caption_head.tokenizer import (
    SPECIAL_TOKENS,
    build_caption_tokenizer,
    build_subset_vocab,
)

CAPTIONS = [
    "a large red striped circle to the left of the small blue square",
    "green grass covering the bottom of the image",
    "a medium yellow dotted star in front of the wall",
]


def test_subset_vocab_keeps_tokenization(tmp_path):
    vocab = build_subset_vocab(CAPTIONS)
    assert tuple(vocab[:5]) == SPECIAL_TOKENS  # [PAD] keeps id 0
    assert len(vocab) == len(set(vocab)) < 40
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")

    full, subset = build_caption_tokenizer(), build_caption_tokenizer(str(path))
    assert len(subset) == len(vocab)
    for caption in CAPTIONS:
        assert subset.tokenize(caption) == full.tokenize(caption)
        ids = subset(caption)["input_ids"]
        assert ids[0] == subset.cls_token_id == 2 and ids[-1] == subset.sep_token_id == 3
        assert subset.decode(ids, skip_special_tokens=True) == caption
    assert subset.tokenize("a purple hexagon") == ["a", "[UNK]", "[UNK]"]
