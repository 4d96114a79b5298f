import torch

from pix2cap.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost
from pix2cap.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)


def random_masks(num, h, w, generator):
    """Distinct rectangles, so every target is easy to tell apart."""
    masks = torch.zeros(num, h, w)
    for i in range(num):
        y0 = int(torch.randint(0, h // 2, (1,), generator=generator))
        x0 = int(torch.randint(0, w // 2, (1,), generator=generator))
        hh = int(torch.randint(3, h // 2, (1,), generator=generator))
        ww = int(torch.randint(3, w // 2, (1,), generator=generator))
        masks[i, y0 : y0 + hh, x0 : x0 + ww] = 1
    return masks


def perfect_prediction(targets, num_queries, num_classes, generator):
    """Predictions equal to the targets, placed at random query slots; returns the slots too."""
    batch = len(targets)
    h, w = targets[0]["masks"].shape[-2:]
    logits = torch.full((batch, num_queries, num_classes + 1), -10.0)
    logits[..., -1] = 10.0  # unused queries say "no object"
    masks = torch.full((batch, num_queries, h, w), -20.0)
    slots = []
    for b, t in enumerate(targets):
        perm = torch.randperm(num_queries, generator=generator)[: len(t["labels"])]
        slots.append(perm)
        for j, q in enumerate(perm.tolist()):
            logits[b, q] = -10.0
            logits[b, q, t["labels"][j]] = 10.0
            masks[b, q] = torch.where(t["masks"][j] > 0, 20.0, -20.0)
    return {"pred_logits": logits, "pred_masks": masks}, slots


def test_point_sample_matches_grid_sample_semantics():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # Pixel centres in [0, 1] coordinates: (j + 0.5) / 4.
    coords = torch.tensor([[[0.125, 0.125], [0.875, 0.125], [0.375, 0.625]]])
    out = point_sample(x, coords)
    assert out.shape == (1, 1, 3)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 3.0, 9.0]))


def test_uncertain_points_prefer_the_boundary():
    torch.manual_seed(0)
    logits = torch.linspace(-10, 10, 64).view(1, 1, 1, 64).expand(2, 1, 64, 64).contiguous()
    coords = get_uncertain_point_coords_with_randomness(
        logits, calculate_uncertainty, 100, 3.0, 1.0
    )
    assert coords.shape == (2, 100, 2)
    assert ((coords >= 0) & (coords <= 1)).all()
    # The boundary (logit 0) is at x = 0.5; importance-sampled points crowd around it.
    assert (coords[..., 0] - 0.5).abs().mean() < 0.15
    random_only = get_uncertain_point_coords_with_randomness(
        logits, calculate_uncertainty, 100, 3.0, 0.0
    )
    assert (random_only[..., 0] - 0.5).abs().mean() > 0.18


def test_pairwise_costs_match_direct_computation():
    torch.manual_seed(1)
    inputs = torch.randn(4, 50)
    targets = (torch.rand(3, 50) > 0.5).float()
    ce = batch_sigmoid_ce_cost(inputs, targets)
    dice = batch_dice_cost(inputs, targets)
    for i in range(4):
        for j in range(3):
            direct = torch.nn.functional.binary_cross_entropy_with_logits(inputs[i], targets[j])
            torch.testing.assert_close(ce[i, j], direct)
            p = inputs[i].sigmoid()
            d = 1 - (2 * (p * targets[j]).sum() + 1) / (p.sum() + targets[j].sum() + 1)
            torch.testing.assert_close(dice[i, j], d)


def test_perfect_prediction_recovers_permutation():
    g = torch.Generator().manual_seed(0)
    num_classes, num_queries = 7, 10
    targets = []
    for m in (4, 6):
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (m,), generator=g),
                "masks": random_masks(m, 32, 32, g),
            }
        )
    outputs, slots = perfect_prediction(targets, num_queries, num_classes, g)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=1024)
    indices = matcher(outputs, targets)
    assert len(indices) == 2
    for (pred_idx, tgt_idx), t, slot in zip(indices, targets, slots):
        assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
        assert len(pred_idx) == len(t["labels"])
        # Target j must be matched to the query that holds its copy.
        assigned = dict(zip(tgt_idx.tolist(), pred_idx.tolist()))
        assert assigned == {j: q for j, q in enumerate(slot.tolist())}

    # Its cost is near zero: class prob ~1 (cost -1 each), BCE ~0 and dice ~0.
    b = 0
    pred_idx, tgt_idx = indices[b]
    logits = outputs["pred_logits"][b, pred_idx]
    prob = logits.softmax(-1)[torch.arange(len(tgt_idx)), targets[b]["labels"][tgt_idx]]
    assert (prob > 0.999).all()
    # Sampled at pixel centres (no interpolation across edges), the mask costs vanish.
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) / 32, (ys.flatten() + 0.5) / 32], dim=-1)
    centres = centres[None].expand(len(pred_idx), -1, -1)
    pm = point_sample(outputs["pred_masks"][b, pred_idx][:, None], centres)[:, 0]
    tm = point_sample(targets[b]["masks"][tgt_idx][:, None], centres)[:, 0]
    assert batch_sigmoid_ce_cost(pm, tm).diagonal().max() < 1e-6
    assert batch_dice_cost(pm, tm).diagonal().max() < 1e-6


def test_different_mask_resolutions():
    g = torch.Generator().manual_seed(3)
    masks = random_masks(3, 64, 64, g)
    targets = [{"labels": torch.tensor([0, 1, 2]), "masks": masks}]
    outputs, slots = perfect_prediction(targets, 5, 3, g)
    # Predictions at 1/4 of the target resolution, as from the mask head.
    outputs["pred_masks"] = torch.nn.functional.interpolate(
        outputs["pred_masks"], size=(16, 16), mode="bilinear", align_corners=False
    )
    pred_idx, tgt_idx = HungarianMatcher(num_points=2048)(outputs, targets)[0]
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == dict(enumerate(slots[0].tolist()))


def test_nan_predictions_do_not_crash():
    g = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.tensor([1, 2]), "masks": random_masks(2, 16, 16, g)}]
    outputs, _ = perfect_prediction(targets, 5, 3, g)
    outputs["pred_logits"][0, 0] = float("nan")
    outputs["pred_masks"][0, 1, :4] = float("nan")
    outputs["pred_masks"][0, 2] = float("inf")
    pred_idx, tgt_idx = HungarianMatcher(num_points=256)(outputs, targets)[0]
    assert len(pred_idx) == 2 and len(set(pred_idx.tolist())) == 2
    assert sorted(tgt_idx.tolist()) == [0, 1]

    outputs["pred_logits"][:] = float("nan")
    outputs["pred_masks"][:] = float("nan")
    pred_idx, tgt_idx = HungarianMatcher(num_points=256)(outputs, targets)[0]
    assert len(pred_idx) == 2


def test_empty_targets():
    g = torch.Generator().manual_seed(2)
    targets = [
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)},
        {"labels": torch.tensor([2]), "masks": random_masks(1, 16, 16, g)},
    ]
    outputs = {"pred_logits": torch.randn(2, 6, 4), "pred_masks": torch.randn(2, 6, 8, 8)}
    indices = HungarianMatcher(num_points=128)(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 1 and indices[1][1].tolist() == [0]


def test_more_targets_than_queries_and_fp16_inputs():
    g = torch.Generator().manual_seed(4)
    targets = [{"labels": torch.arange(5) % 3, "masks": random_masks(5, 16, 16, g)}]
    outputs = {
        "pred_logits": torch.randn(1, 3, 4).half(),
        "pred_masks": torch.randn(1, 3, 8, 8).half(),
    }
    pred_idx, tgt_idx = HungarianMatcher(num_points=128)(outputs, targets)[0]
    assert sorted(pred_idx.tolist()) == [0, 1, 2] and len(set(tgt_idx.tolist())) == 3
