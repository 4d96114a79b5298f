"""PancapScore: per-image Entity / Location / Attribute / Relation / Global F1 and Overall.

For one image, both captions are turned into :class:`PanopticContent` (an extractor each),
their entities matched (:func:`match_entities`), and attribute / relation / global items
checked by instance-aware QA in both directions (:mod:`.qa`). Each dimension reports
precision, recall and F1; the scores are F1 x 100 and

    Overall = E + L + A + R + 0.1 * G        (at most 410)

The mean Overall is the formula applied to the dimension means, as the published tables are.
How empty sides count depends on the protocol (:mod:`.protocol`):

- ``official`` (default): a side without items of a dimension makes that side's ratio 0, so
  the image scores F1 0 there, and every image counts in every mean. Where the official code
  would crash (a side without entities), entity F1 is 0 and the image is counted in
  ``official_code_crashes``.
- ``lenient``: a dimension is undefined (None) for an image when neither side has an item of
  it and is left out of that mean; when only one side has items, F1 is 0. A per-image Overall
  is None when any of its five parts is undefined.

Every result carries the setup (protocol, judge, extractors, embedder, WordNet) and
``official``, True only for the official protocol with language-model extraction and judging,
the all-mpnet-base-v2 embedder and WordNet -- anything else is an approximation and says so
in ``approximation_note``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

from .content import PanopticContent
from .extractors import ContentExtractor
from .judges import PancapJudge
from .matching import Embedder, SynonymProvider, match_entities
from .protocol import CRASH_REASONS, DEFAULT_PROTOCOL, check_protocol
from .qa import build_questions, score_answers

__all__ = [
    "DIMENSION_KEYS",
    "OFFICIAL_EMBEDDER",
    "overall_score",
    "precision_recall_f1",
    "PancapScorer",
    "summarize",
]

logger = logging.getLogger(__name__)

# Short key -> long name, in the order of the published tables.
DIMENSION_KEYS = {"E": "entity", "L": "location", "A": "attribute", "R": "relation", "G": "global"}
OFFICIAL_EMBEDDER = "all-mpnet-base-v2"
GLOBAL_WEIGHT = 0.1


def overall_score(e: float, l: float, a: float, r: float, g: float) -> float:
    """``E + L + A + R + 0.1 * G`` on scores already x100."""
    return e + l + a + r + GLOBAL_WEIGHT * g


def precision_recall_f1(
    precision: Optional[float], recall: Optional[float], protocol: str = "lenient"
) -> dict[str, Optional[float]]:
    """``{"precision", "recall", "f1"}`` in [0, 1]; the rules for undefined (None) sides are
    in the module docstring: ``lenient``: both None -> f1 None, one None -> f1 0;
    ``official``: a None side is 0."""
    if check_protocol(protocol) == "official":
        precision = 0.0 if precision is None else precision
        recall = 0.0 if recall is None else recall
    if precision is None and recall is None:
        f1 = None
    elif precision is None or recall is None:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _ratio(hits: float, total: int) -> Optional[float]:
    return hits / total if total else None


@dataclass
class _Setup:
    protocol: str
    judge: str
    extractor: dict
    embedder: str
    wordnet: str
    official: bool
    approximation_note: str

    def as_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "judge": self.judge,
            "extractor": dict(self.extractor),
            "embedder": self.embedder,
            "wordnet": self.wordnet,
            "official": self.official,
            "approximation_note": self.approximation_note,
        }


class PancapScorer:
    """Scores predicted panoptic captions against ground-truth ones.

    Args:
        judge: answers the QA questions (see :mod:`.judges`).
        gt_extractor, pred_extractor: turn captions into content (see :mod:`.extractors`).
        embedder: ``list[str] -> Float[N, D]`` for the embedding rule of entity matching;
            None skips that rule.
        synonyms: ``(a, b) -> score`` WordNet-style synonym scorer; None = unavailable.
        embedder_name: how results name the embedder (default: its ``name`` attribute).
        protocol: ``"official"`` (default) or ``"lenient"`` (:mod:`.protocol`). Extractors
            that read extraction lines must read them by the same protocol.
    """

    def __init__(
        self,
        judge: PancapJudge,
        gt_extractor: ContentExtractor,
        pred_extractor: ContentExtractor,
        embedder: Optional[Embedder] = None,
        synonyms: Optional[SynonymProvider] = None,
        embedder_name: Optional[str] = None,
        protocol: str = DEFAULT_PROTOCOL,
    ):
        self.protocol = check_protocol(protocol)
        for side, extractor in (("ground-truth", gt_extractor), ("prediction", pred_extractor)):
            reads = getattr(extractor, "protocol", None)
            if reads is not None and reads != self.protocol:
                raise ValueError(
                    f"the {side} extractor {extractor.name!r} reads lines by the {reads!r} "
                    f"protocol but the scorer uses {self.protocol!r}"
                )
        self.judge = judge
        self.gt_extractor = gt_extractor
        self.pred_extractor = pred_extractor
        self.embedder = embedder
        self.synonyms = synonyms
        if embedder_name is None:
            embedder_name = "none" if embedder is None else str(
                getattr(embedder, "name", type(embedder).__name__)
            )
        self.setup = self._describe(embedder_name)

    def _describe(self, embedder_name: str) -> _Setup:
        reasons = []
        if self.protocol != "official":
            reasons.append(
                f"{self.protocol} protocol (tolerant parsing, normalised names, empty "
                "dimensions left out of the means) instead of the official one"
            )
        if not self.gt_extractor.is_llm or not self.pred_extractor.is_llm:
            reasons.append(
                f"content extracted by {self.gt_extractor.name} (ground truth) and "
                f"{self.pred_extractor.name} (prediction) instead of a language model"
            )
        if not self.judge.is_llm:
            reasons.append(f"questions answered by the {self.judge.name} judge, not a language model")
        if embedder_name != OFFICIAL_EMBEDDER:
            reasons.append(f"entity names embedded by {embedder_name}, not {OFFICIAL_EMBEDDER}")
        wordnet = "available" if self.synonyms is not None else "unavailable"
        if self.synonyms is None:
            reasons.append("WordNet synonym matching unavailable")
        official = not reasons
        common = (
            "QA no-questions are rule-based negations and A/R/G precision asks the predicted "
            "items of the ground truth (see pix2cap.evaluation.pancapscore.qa)"
        )
        if official:
            note = f"official PancapScore setup; {common}"
        else:
            note = "APPROXIMATION of PancapScore, not the official number: " + "; ".join(
                reasons
            ) + f"; {common}"
        return _Setup(
            protocol=self.protocol,
            judge=self.judge.describe(),
            extractor={"gt": self.gt_extractor.name, "pred": self.pred_extractor.name},
            embedder=embedder_name,
            wordnet=wordnet,
            official=official,
            approximation_note=note,
        )

    def score_contents(self, gt: PanopticContent, pred: PanopticContent) -> dict:
        """Per-dimension P/R/F1, the x100 scores and counts for one image's contents."""
        protocol = self.protocol
        match = match_entities(
            gt.entities, pred.entities, self.embedder, self.synonyms, protocol=protocol
        )
        matched = len(match.pairs)
        hits = len(match.location_hits)
        dims = {
            "entity": precision_recall_f1(
                _ratio(matched, match.num_pred), _ratio(matched, match.num_gt), protocol
            ),
            "location": precision_recall_f1(
                _ratio(hits, match.num_pred_boxes), _ratio(hits, match.num_gt_boxes), protocol
            ),
        }
        # Recall: ground-truth items asked of the prediction; precision: the reverse.
        questions, slots = build_questions(gt, match.gt_to_pred)
        answers, bad_r = self.judge.answer(questions, pred) if questions else ([], 0)
        recall = score_answers(questions, slots, answers, bad_r)
        questions, slots = build_questions(pred, match.pred_to_gt)
        answers, bad_p = self.judge.answer(questions, gt) if questions else ([], 0)
        precision = score_answers(questions, slots, answers, bad_p)
        for dimension in ("attribute", "relation", "global"):
            dims[dimension] = precision_recall_f1(
                precision.ratio(dimension), recall.ratio(dimension), protocol
            )
        scores = {
            key: None if dims[name]["f1"] is None else 100.0 * dims[name]["f1"]
            for key, name in DIMENSION_KEYS.items()
        }
        parts = [scores[k] for k in DIMENSION_KEYS]
        scores["Overall"] = None if any(v is None for v in parts) else overall_score(*parts)
        crash = None
        if protocol == "official" and not (match.num_gt and match.num_pred):
            crash = (
                "no_entities" if not (match.num_gt or match.num_pred)
                else "no_gt_entities" if not match.num_gt else "no_pred_entities"
            )
        return {
            **scores,
            "protocol": protocol,
            "official_code_crash": crash,
            "dimensions": dims,
            "counts": {
                "gt_entities": match.num_gt,
                "pred_entities": match.num_pred,
                "matched_entities": matched,
                "match_rules": _count_rules(match.rules.values()),
                "gt_boxes": match.num_gt_boxes,
                "pred_boxes": match.num_pred_boxes,
                "location_hits": hits,
                "gt_items": {d: len(recall.scores[d]) for d in recall.scores},
                "pred_items": {d: len(precision.scores[d]) for d in precision.scores},
                "gt_items_unmatched": dict(recall.unanswerable),
                "pred_items_unmatched": dict(precision.unanswerable),
            },
            "malformed": {
                "gt_extraction": gt.malformed,
                "pred_extraction": pred.malformed,
                "judge_answers": bad_r + bad_p,
            },
        }

    def score_image(
        self,
        gt_caption: str,
        pred_caption: str,
        pred_structured: Optional[Mapping] = None,
        image_path: str = "",
    ) -> dict:
        """Score one image from its two captions (and the prediction's structured content).

        A judge call that failed for good (its retries spent: an unreachable server) would
        score its questions as wrong; the image is then marked ``skipped`` (with
        ``judge_failed_requests``) and :func:`summarize` leaves it out and counts it.
        """
        failed_before = self.judge.stats.get("failed_requests", 0)
        gt = self.gt_extractor.extract(gt_caption, None, where=f"{image_path} ground truth")
        pred = self.pred_extractor.extract(
            pred_caption, pred_structured, where=f"{image_path} prediction.structured"
        )
        result = self.score_contents(gt, pred)
        result["image_path"] = image_path
        failed = self.judge.stats.get("failed_requests", 0) - failed_before
        if failed:
            result["skipped"] = True
            result["judge_failed_requests"] = failed
        return result

    def evaluate(self, items: Iterable[Mapping]) -> dict:
        """Score a set of images.

        Args:
            items: ``{"image_path", "gt_response", "model_response", "structured"?}`` each.

        Returns:
            ``{"setup": ..., "mean": {E, L, A, R, G, Overall, precision/recall means,
            num_images, num_defined}, "per_image": [...], "judge_stats": ...}``.
        """
        per_image = []
        for item in items:
            per_image.append(
                self.score_image(
                    item["gt_response"],
                    item.get("model_response", "") or "",
                    item.get("structured"),
                    image_path=str(item.get("image_path", "")),
                )
            )
        return {
            "setup": self.setup.as_dict(),
            "mean": summarize(per_image),
            "per_image": per_image,
            "judge_stats": dict(self.judge.stats),
        }


def _count_rules(rules: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rules:
        counts[r] = counts.get(r, 0) + 1
    return counts


def summarize(per_image: list[dict]) -> dict:
    """Mean scores over images (module docstring rules); images marked ``skipped`` (their
    judge could not be reached) are left out and counted in ``skipped_images``."""
    protocols = sorted({r.get("protocol", "lenient") for r in per_image})
    if len(protocols) > 1:
        raise ValueError(f"cannot average images scored by different protocols: {protocols}")
    skipped = sum(1 for r in per_image if r.get("skipped"))
    per_image = [r for r in per_image if not r.get("skipped")]
    mean: dict = {
        "protocol": protocols[0] if protocols else DEFAULT_PROTOCOL,
        "num_images": len(per_image),
        "skipped_images": skipped,
        "num_defined": {},
    }
    for key, name in DIMENSION_KEYS.items():
        values = [r[key] for r in per_image if r[key] is not None]
        mean[key] = sum(values) / len(values) if values else None
        mean["num_defined"][key] = len(values)
        for side in ("precision", "recall"):
            side_values = [
                r["dimensions"][name][side]
                for r in per_image
                if r["dimensions"][name][side] is not None
            ]
            mean[f"{key}_{side}"] = (
                100.0 * sum(side_values) / len(side_values) if side_values else None
            )
    parts = [mean[k] or 0.0 for k in DIMENSION_KEYS]
    mean["Overall"] = overall_score(*parts) if per_image else None
    mean["malformed"] = {
        k: sum(r["malformed"][k] for r in per_image)
        for k in ("gt_extraction", "pred_extraction", "judge_answers")
    }
    if mean["protocol"] == "official":
        mean["official_code_crashes"] = {
            reason: sum(1 for r in per_image if r.get("official_code_crash") == reason)
            for reason in CRASH_REASONS
        }
    return mean


def format_table(mean: dict) -> str:
    """The mean E / L / A / R / G / Overall scores as a small text table, with the protocol
    and, under the official one, the images where the official code would have crashed."""
    keys = list(DIMENSION_KEYS) + ["Overall"]
    header = " | ".join(f"{k:>8}" for k in keys)
    values = " | ".join(
        f"{mean[k]:8.2f}" if mean.get(k) is not None else f"{'n/a':>8}" for k in keys
    )
    lines = [f"PancapScore ({mean.get('protocol', DEFAULT_PROTOCOL)} protocol)", header,
             "-" * len(header), values]
    crashes = {k: v for k, v in (mean.get("official_code_crashes") or {}).items() if v}
    if crashes:
        lines.append(
            "scored 0 where the official code would crash: "
            + ", ".join(f"{n} image(s) {CRASH_REASONS[k].split(' (')[0]}" for k, n in crashes.items())
        )
    return "\n".join(lines)
