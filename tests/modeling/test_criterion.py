import math

import torch
import torch.distributed as dist

from pix2cap.modeling.caption_head import DenseCaptionHead
from pix2cap.modeling.criterion import SetCriterion
from pix2cap.modeling.matcher import HungarianMatcher

NUM_CLASSES = 5
WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_caption": 0.1}


def make_criterion(caption_loss_fn=None, num_points=256, **kwargs):
    return SetCriterion(
        num_classes=NUM_CLASSES,
        matcher=HungarianMatcher(num_points=num_points),
        weight_dict=WEIGHTS,
        eos_coef=0.1,
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        caption_loss_fn=caption_loss_fn,
        **kwargs,
    )


def make_targets(generator, sizes=(2, 3), hw=16, with_captions=True):
    targets = []
    for m in sizes:
        masks = torch.zeros(m, hw, hw)
        for j in range(m):
            y0, x0 = torch.randint(0, hw // 2, (2,), generator=generator).tolist()
            masks[j, y0 : y0 + hw // 2, x0 : x0 + hw // 2] = 1
        target = {
            "labels": torch.randint(0, NUM_CLASSES, (m,), generator=generator),
            "masks": masks,
        }
        if with_captions:
            words = torch.randint(3, 20, (m, 4), generator=generator)
            target["caption_tokens"] = torch.cat(
                [
                    torch.ones(m, 1, dtype=torch.long),
                    words,
                    torch.full((m, 1), 2),
                    torch.zeros(m, 2, dtype=torch.long),
                ],
                dim=1,
            )  # [BOS] w w w w [EOS] [PAD] [PAD]
        targets.append(target)
    return targets


def tiny_caption_head():
    return DenseCaptionHead(
        query_dim=8,
        global_dim=6,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        dropout=0.0,
        max_length=8,
        vocab_size=20,
        bottleneck_dim=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_outputs(batch=2, queries=6, hw=8, dim=8, num_aux=2, requires_grad=False):
    def layer():
        return {
            "pred_logits": torch.randn(
                batch, queries, NUM_CLASSES + 1, requires_grad=requires_grad
            ),
            "pred_masks": torch.randn(batch, queries, hw, hw, requires_grad=requires_grad),
            "query_features": torch.randn(batch, queries, dim, requires_grad=requires_grad),
        }

    outputs = layer()
    outputs["global_features"] = torch.randn(batch, 6, requires_grad=requires_grad)
    outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    return outputs


def test_loss_keys_with_layer_suffixes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = tiny_caption_head()
    criterion = make_criterion(head.loss)
    losses = criterion(make_outputs(), make_targets(g))
    base = {"loss_ce", "loss_mask", "loss_dice", "loss_caption"}
    assert set(losses) == base | {f"{k}_{i}" for k in base for i in range(2)}
    for v in losses.values():
        assert v.ndim == 0 and torch.isfinite(v)
    # The head is called, not owned: its parameters are not the criterion's.
    assert len(list(criterion.parameters())) == 0
    assert "empty_weight" not in criterion.state_dict()

    # Caption loss on the last two predictions only (final + aux 1).
    criterion = make_criterion(head.loss, num_caption_layers=2)
    losses = criterion(make_outputs(), make_targets(g))
    assert {k for k in losses if k.startswith("loss_caption")} == {"loss_caption", "loss_caption_1"}
    assert "loss_mask_0" in losses

    # Without a caption function, or without the "captions" loss, no caption keys.
    assert not any("caption" in k for k in make_criterion(None)(make_outputs(), make_targets(g)))
    crit = make_criterion(head.loss, losses=("labels", "masks"))
    assert not any("caption" in k for k in crit(make_outputs(), make_targets(g)))


def test_weighting_by_base_name():
    criterion = make_criterion()
    losses = {
        "loss_ce": torch.tensor(1.0),
        "loss_dice_3": torch.tensor(2.0),
        "loss_other": torch.tensor(3.0),
    }
    weighted = criterion.weighted(losses)
    assert set(weighted) == {"loss_ce", "loss_dice_3"}
    assert weighted["loss_ce"].item() == 2.0 and weighted["loss_dice_3"].item() == 10.0
    assert criterion.loss_weight("loss_caption_8") == 0.1


def test_classification_loss_uses_no_object_weight():
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    criterion = make_criterion(losses=("labels",))
    outputs = make_outputs(num_aux=0)
    targets = make_targets(g, with_captions=False)
    indices = criterion.matcher(outputs, targets)
    loss = criterion.loss_labels(outputs, targets, indices, 1.0)["loss_ce"]

    target_classes = torch.full((2, 6), NUM_CLASSES)
    for b, (src, tgt) in enumerate(indices):
        target_classes[b, src] = targets[b]["labels"][tgt]
    weights = torch.ones(NUM_CLASSES + 1)
    weights[-1] = 0.1
    logp = outputs["pred_logits"].log_softmax(-1)
    nll = -logp.gather(-1, target_classes[..., None])[..., 0]
    w = weights[target_classes]
    torch.testing.assert_close(loss, (nll * w).sum() / w.sum())


def test_mask_losses_normalised_by_number_of_masks():
    num_points = 200
    # Logit 0 everywhere: BCE is log 2 at every point whatever the target; with all-zero
    # targets (exact under bilinear sampling, borders included), dice is 1 - 1 / (0.5 P + 1)
    # per mask. Correct normalisation by the number of masks makes both independent of how
    # many masks the batch holds.
    expected_dice = 1 - 1 / (0.5 * num_points + 1)
    for sizes in [(1,), (2, 3), (4, 0)]:
        criterion = make_criterion(losses=("labels", "masks"), num_points=num_points)
        targets = [
            {"labels": torch.zeros(m, dtype=torch.long), "masks": torch.zeros(m, 16, 16)}
            for m in sizes
        ]
        outputs = {
            "pred_logits": torch.randn(len(sizes), 6, NUM_CLASSES + 1),
            "pred_masks": torch.zeros(len(sizes), 6, 8, 8),
        }
        losses = criterion(outputs, targets)
        torch.testing.assert_close(losses["loss_mask"], torch.tensor(math.log(2)))
        torch.testing.assert_close(losses["loss_dice"], torch.tensor(expected_dice))

    # No target at all: the normaliser is clamped at 1 and the losses are 0, not NaN.
    losses = make_criterion(losses=("labels", "masks"))(
        {"pred_logits": torch.randn(1, 6, 6), "pred_masks": torch.zeros(1, 6, 8, 8)},
        [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)}],
    )
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert torch.isfinite(losses["loss_ce"])


def test_normaliser_is_all_reduced_under_distributed(tmp_path):
    # A one-process group exercises the all-reduce path (sum then divide by world size).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        targets = [{"labels": torch.zeros(3, dtype=torch.long), "masks": torch.ones(3, 4, 4)}]
        assert SetCriterion._num_masks(targets, torch.device("cpu")) == 3.0
        empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.ones(0, 4, 4)}]
        assert SetCriterion._num_masks(empty, torch.device("cpu")) == 1.0
    finally:
        dist.destroy_process_group()


def test_captions_use_matched_queries_and_skip_missing():
    g = torch.Generator().manual_seed(2)
    calls = []

    def record(query_feats, global_feats, tokens):
        calls.append((query_feats, global_feats, tokens))
        return query_feats.sum() * 0 + tokens.shape[0]

    criterion = make_criterion(record, losses=("captions",))
    targets = make_targets(g, sizes=(2, 3))
    targets[1]["caption_valid"] = torch.tensor([True, False, True])
    targets[0]["caption_tokens"][1] = torch.tensor([1, 2, 0, 0, 0, 0, 0, 0])  # empty description
    outputs = make_outputs(num_aux=0)
    indices = criterion.matcher(outputs, targets)
    losses = criterion.loss_captions(outputs, targets, indices, 1.0)
    q, gf, tokens = calls[-1]
    assert losses["loss_caption"].item() == 3  # 1 + 2 valid captions
    assert q.shape == (3, 8) and gf.shape == (3, 6) and tokens.shape == (3, 8)
    # Rows line up: the feature of the query matched to a target goes with its caption.
    expected = []
    for b, (src, tgt) in enumerate(indices):
        for s, t in zip(src.tolist(), tgt.tolist()):
            valid = targets[b].get("caption_valid", torch.ones(5, dtype=torch.bool))[t]
            if valid and (targets[b]["caption_tokens"][t] != 0).sum() > 2:
                expected.append(
                    (
                        outputs["query_features"][b, s],
                        outputs["global_features"][b],
                        targets[b]["caption_tokens"][t],
                    )
                )
    for row, (eq, eg, et) in enumerate(expected):
        assert torch.equal(q[row], eq) and torch.equal(gf[row], eg) and torch.equal(tokens[row], et)

    # No captions anywhere: a zero loss, without calling the caption function.
    calls.clear()
    outputs = make_outputs(num_aux=1, requires_grad=True)
    no_caps = make_targets(g, with_captions=False)
    losses = criterion(outputs, no_caps)
    assert not calls
    assert losses["loss_caption"].item() == 0 and losses["loss_caption_0"].item() == 0
    losses["loss_caption"].backward()  # still part of the graph


def test_losses_fall_when_fitting_one_batch():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    head = tiny_caption_head()
    criterion = make_criterion(head.loss, num_points=128)
    targets = make_targets(g)
    outputs = make_outputs(hw=16, requires_grad=True)
    leaves = [outputs["global_features"]]
    for layer in [outputs] + outputs["aux_outputs"]:
        leaves += [layer["pred_logits"], layer["pred_masks"], layer["query_features"]]
    optimizer = torch.optim.Adam(
        [{"params": leaves, "lr": 0.2}, {"params": list(head.parameters()), "lr": 0.05}]
    )

    history = []
    for _ in range(50):
        losses = criterion(outputs, targets)
        total = sum(criterion.weighted(losses).values())
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    first, last = history[0], history[-1]
    assert set(first) == set(last) and len(first) == 12
    for key in first:
        assert last[key] < 0.5 * first[key], (key, first[key], last[key])
    # Monotone enough: the weighted total of the last steps is below that of the first ones.
    totals = [sum(criterion.loss_weight(k) * v for k, v in h.items()) for h in history]
    assert max(totals[-5:]) < min(totals[:5])
    assert head.embeddings.word_embeddings.weight.grad is not None
