import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pix2cap.modeling.caption_head import (
    CAPTION_HEAD_REGISTRY,
    DenseCaptionHead,
    build_caption_tokenizer,
    decode,
    encode_captions,
)
from pix2cap.modeling.caption_head.text_decoder import MemoryProjection


def tiny_head(**overrides):
    kwargs = dict(
        query_dim=16,
        global_dim=12,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        dropout=0.0,
        max_length=12,
        vocab_size=50,
        bottleneck_dim=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return DenseCaptionHead(**kwargs)


def test_registered_and_shapes():
    assert CAPTION_HEAD_REGISTRY.get("DenseCaptionHead") is DenseCaptionHead
    torch.manual_seed(0)
    head = tiny_head()
    q, g = torch.randn(3, 16), torch.randn(3, 12)
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 9, 9, 10, 11, 2]])
    logits = head(q, g, tokens[:, :-1])
    assert logits.shape == (3, 5, 50)
    assert head.encode_memory(q, g).shape == (3, 2, 32)
    assert head.encode_memory(q, None).shape == (3, 1, 32)

    loss = head.loss(q, g, tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Untrained, the loss is near log(V) (label smoothing keeps it close too).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 1.0
    loss.backward()
    assert head.embeddings.word_embeddings.weight.grad is not None

    head.eval()
    out = head.generate(q, g, max_length=7)
    assert out.dtype == torch.long and out.shape[0] == 3 and out.shape[1] <= 7
    assert (out[:, 0] == 1).all()
    out, scores = head.generate(q, None, num_beams=3, return_scores=True)
    assert out.shape[0] == 3 and out.shape[1] <= 12 and scores.shape == (3,)
    assert (scores <= 0).all()
    assert head.generate(q[:0], g[:0]).shape[0] == 0


def test_output_projection_tied_to_word_embeddings():
    head = tiny_head()
    names = [n for n, _ in head.named_parameters()]
    assert not any("lm_head" in n or "decoder.weight" in n for n in names)
    with torch.no_grad():
        head.embeddings.word_embeddings.weight[7].add_(1.0)
    hidden = torch.randn(2, 32)
    expected = head.lm_transform(hidden) @ head.embeddings.word_embeddings.weight.T + head.lm_bias
    torch.testing.assert_close(head.lm_logits(hidden), expected)


def test_attention_mask():
    mask = DenseCaptionHead.attention_mask(2, 3)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_memory_does_not_see_text_and_text_is_causal():
    torch.manual_seed(1)
    head = tiny_head().eval()
    q, g = torch.randn(2, 16), torch.randn(2, 12)
    a = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    b = a.clone()
    b[:, 3:] = torch.tensor([20, 21])
    la, lb = head(q, g, a), head(q, g, b)
    # Changing tokens 3.. leaves the predictions at positions 0..2 untouched.
    torch.testing.assert_close(la[:, :3], lb[:, :3])
    assert not torch.allclose(la[:, 3:], lb[:, 3:])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_kv_cache_matches_full_recomputation(num_beams):
    torch.manual_seed(2)
    head = tiny_head(max_length=16).eval()
    q, g = torch.randn(6, 16), torch.randn(6, 12)
    with torch.no_grad():
        # Larger weights than the N(0, 0.02) init, so that logits are far from ties and the
        # comparison is about the cache, not about rounding.
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
        # Make EOS likely enough that some captions end early and others run to the limit.
        head.lm_bias[2] = 3.0
    for suppress in (True, False):
        cached, s1 = head.generate(
            q, g, num_beams=num_beams, use_cache=True, suppress_repeat=suppress, return_scores=True
        )
        full, s2 = head.generate(
            q, g, num_beams=num_beams, use_cache=False, suppress_repeat=suppress, return_scores=True
        )
        assert torch.equal(cached, full)
        torch.testing.assert_close(s1, s2)
        lengths = (cached != 0).sum(1)
        assert lengths.min() < 16 and lengths.max() > lengths.min()
        ended = (cached == 2).any(1)
        assert ended.any()
    if num_beams == 1:
        # Greedy with suppression never emits the same token twice in a row.
        out = head.generate(q, g, suppress_repeat=True)
        body = out[:, 1:]
        repeats = (body[:, 1:] == body[:, :-1]) & (body[:, 1:] != 0)
        assert not repeats.any()


def test_beam_search_scores_at_least_greedy():
    torch.manual_seed(3)
    head = tiny_head(max_length=8).eval()
    q, g = torch.randn(4, 16), torch.randn(4, 12)
    _, greedy = head.generate(q, g, num_beams=1, return_scores=True, suppress_repeat=False)
    _, beam = head.generate(q, g, num_beams=4, return_scores=True, suppress_repeat=False)
    # Greedy's path is among those beam search explores only approximately, so compare loosely:
    # the best beam's mean log-prob is never much worse than greedy's.
    assert (beam >= greedy - 0.05).all()


def test_bottleneck_gradient_scaled_by_one_third():
    torch.manual_seed(4)
    scaled = MemoryProjection(16, 8, 32, grad_scale=1.0 / 3.0, eps=1e-12)
    plain = MemoryProjection(16, 8, 32, grad_scale=1.0, eps=1e-12)
    plain.load_state_dict(scaled.state_dict())
    x1 = torch.randn(5, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    w = torch.randn(5, 32)
    y1, y2 = scaled(x1), plain(x2)
    torch.testing.assert_close(y1, y2)  # forward unchanged
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad / 3.0)
    # The projection's own weights are trained at full strength.
    torch.testing.assert_close(scaled.down.weight.grad, plain.down.weight.grad)

    head = tiny_head()
    q = torch.randn(2, 16, requires_grad=True)
    head.loss(q, torch.randn(2, 12), torch.tensor([[1, 5, 2], [1, 6, 2]])).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_tokenizer_round_trip():
    tokenizer = build_caption_tokenizer()
    assert len(tokenizer) == 30522
    assert tokenizer.cls_token_id == 101 and tokenizer.sep_token_id == 102
    assert tokenizer.pad_token_id == 0
    captions = ["A brown dog, lying on the grass to the left of the bench.", "it's a red car"]
    ids = encode_captions(captions, max_length=20)
    assert ids.shape == (2, 20) and ids.dtype == torch.long
    assert ids[0, 0] == 101 and (ids[1] == 102).sum() == 1
    assert ids[1, -1] == 0
    assert decode(ids) == [c.lower() for c in captions]
    # Truncation keeps [SEP] at the end; decode cuts at [SEP] even without [CLS].
    short = encode_captions(captions[:1], max_length=6)
    assert short[0, -1] == 102
    assert decode([[1037, 3899, 102, 2000]]) == ["a dog"]


def test_tiny_head_memorises_captions():
    torch.manual_seed(0)
    captions = [
        "a black cat sleeping on a sofa",
        "two people walking along the beach",
        "a red bus parked near a building",
        "green trees behind a wooden fence",
        "a plate of pasta with tomato sauce",
    ]
    wordpiece = encode_captions(captions, max_length=12)
    # Train over the captions' own tokens only (a compact vocabulary keeps the test fast on a
    # CPU); [PAD] stays 0 and the mapping is undone before decoding with the real tokenizer.
    used = torch.unique(wordpiece)  # sorted, so [PAD] (0) maps to 0
    to_compact = {int(t): i for i, t in enumerate(used)}
    tokens = torch.tensor([[to_compact[int(t)] for t in row] for row in wordpiece])
    head = DenseCaptionHead(
        query_dim=16,
        global_dim=16,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        dropout=0.0,
        max_length=12,
        vocab_size=len(used),
        label_smoothing=0.1,
        bottleneck_dim=32,
        bos_token_id=to_compact[101],
        eos_token_id=to_compact[102],
        pad_token_id=0,
    )
    q = torch.randn(5, 16)
    g = torch.randn(1, 16).expand(5, -1)  # one image: a shared global token
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss = head.loss(q, g, tokens)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 3
    head.eval()
    for use_cache in (True, False):
        for num_beams in (1, 3):
            out = head.generate(q, g, use_cache=use_cache, num_beams=num_beams)
            assert decode(used[out]) == captions


def _head_cfg(vocab_file=""):
    from pix2cap.config.config import CfgNode

    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    cfg.MODEL.MASK_FORMER = CfgNode(dict(HIDDEN_DIM=16))
    cfg.MODEL.SEM_SEG_HEAD = CfgNode(dict(CONVS_DIM=12))
    cfg.MODEL.CAPTION_HEAD = CfgNode(
        dict(
            NAME="DenseCaptionHead",
            HIDDEN_SIZE=32,
            NUM_LAYERS=3,
            NUM_HEADS=4,
            INTERMEDIATE_SIZE=64,
            DROPOUT=0.1,
            MAX_LENGTH=40,
            LABEL_SMOOTHING=0.1,
            BOTTLENECK_DIM=8,
            BOTTLENECK_GRAD_SCALE=1.0 / 3.0,
            VOCAB_FILE=vocab_file,
        )
    )
    return cfg


def test_build_from_config():
    cfg = _head_cfg()
    head = CAPTION_HEAD_REGISTRY.get(cfg.MODEL.CAPTION_HEAD.NAME)(cfg, num_layers=1)
    assert len(head.layers) == 1  # explicit keywords override the config
    assert head.max_length == 40 and head.query_proj.grad_scale == pytest.approx(1 / 3)
    # The memory widths are those of the decoder query and the pixel decoder.
    assert (head.query_proj.down.in_features, head.global_proj.down.in_features) == (16, 12)
    q, g = torch.randn(2, 16), torch.randn(2, 12)
    assert head.encode_memory(q, g).shape == (2, 2, 32)
    # Vocabulary size and special ids are the packaged tokenizer's.
    tokenizer = build_caption_tokenizer()
    assert head.embeddings.word_embeddings.weight.shape == (len(tokenizer), 32) == (30522, 32)
    assert (head.bos_token_id, head.eos_token_id, head.pad_token_id) == (
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.pad_token_id,
    )


def test_build_from_config_vocab_file(tmp_path):
    vocab = tmp_path / "vocab.txt"
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]
    vocab.write_text("\n".join(pieces))
    head = DenseCaptionHead(_head_cfg(str(vocab)))
    assert head.vocab_size == 8 and head.lm_bias.shape == (8,)
    assert (head.bos_token_id, head.eos_token_id, head.pad_token_id) == (2, 3, 0)
    # An explicit tokenizer wins over VOCAB_FILE.
    head = DenseCaptionHead(_head_cfg(str(vocab)), tokenizer=build_caption_tokenizer())
    assert head.vocab_size == 30522 and head.bos_token_id == 101


def test_caption_dropout_is_an_unbiased_dropout():
    from pix2cap.modeling.caption_head.text_decoder import CaptionDropout

    drop = CaptionDropout(0.1).train()
    x = torch.randn(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    # p is rounded to 6554 / 65536; kept elements are scaled by the inverse keep probability.
    p = 6554 / 65536
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the torch generator draws the mask
    # Its 16-bit parts are independent draws: rows of a small tensor differ.
    small = drop(torch.ones(64, 4))
    assert len({tuple(row.tolist()) for row in small != 0}) > 1
    assert drop.eval()(x) is x
    assert CaptionDropout(0.0).train()(x) is x
    assert torch.equal(CaptionDropout(1.0).train()(x), torch.zeros_like(x))


def test_cpu_attention_with_dropout_is_sdpa_in_expectation():
    from pix2cap.modeling.caption_head.text_decoder import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, 0, :, 0] = False  # image 1: key 0 is padding
    mask[1, 0, 0, 1] = True  # (its first query then sees key 1)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention(q, k, v, mask, 0.0), exact)
    torch.manual_seed(0)
    draws = torch.stack([attention(q, k, v, mask, 0.1) for _ in range(4000)])
    # Unbiased: every mean within 5 standard errors of the exact attention.
    standard_error = draws.std(0) / len(draws) ** 0.5
    assert ((draws.mean(0) - exact).abs() <= 5 * standard_error + 1e-6).all()
    assert torch.isfinite(draws).all()
    # Masked keys never reach the output, whatever their values.
    v2 = v.clone()
    v2[1, :, 0] = 1e6
    torch.manual_seed(1)
    first = attention(q, k, v, mask, 0.1)
    torch.manual_seed(1)
    torch.testing.assert_close(attention(q, k, v2, mask, 0.1), first)
    # Gradients reach q, k and v.
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    attention(q, k, v, mask, 0.1).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
