"""PancapScore, the metric of Panoptic Captioning (SA-Pancap), and its building blocks.

Pipeline per image: extract content from both captions (:mod:`.extractors`, line format in
:mod:`.content`), match entities (:mod:`.matching`), answer instance-aware yes/no questions
with a judge (:mod:`.qa`, :mod:`.judges`), combine into E/L/A/R/G F1 and
``Overall = E + L + A + R + 0.1 * G`` (:mod:`.score`). Without a language model (the
``structured`` judge, ``heuristic``/``structured`` extractors) the numbers are labelled an
approximation. Lines are read, names compared and empty sides averaged by a protocol
(:mod:`.protocol`): ``official`` (default) reproduces the authors' scorer, ``lenient`` is
pix2cap's tolerant reading. ``tools/eval_pancapscore.py`` runs it on SA-Pancap-style JSON
files.
"""

from .content import (
    Attribute,
    Entity,
    GlobalItem,
    PanopticContent,
    Relation,
    entity_refs,
    parse_extraction,
    rewrite_entity_refs,
)
from .extractors import (
    PANCAP_EXTRACTOR_REGISTRY,
    AutoExtractor,
    ContentExtractor,
    HeuristicExtractor,
    LinesExtractor,
    LLMExtractor,
    StructuredExtractor,
    build_extractor,
    extraction_prompt,
    extractor_for,
)
from .judges import (
    PANCAP_JUDGE_REGISTRY,
    HFLocalJudge,
    LLMJudge,
    OpenAIHTTPJudge,
    PancapJudge,
    StructuredJudge,
    build_judge,
    qa_prompt,
)
from .matching import (
    EntityMatch,
    SentenceTransformerEmbedder,
    WordNetSynonyms,
    box_iou,
    default_embedder_path,
    load_wordnet,
    match_entities,
)
from .protocol import (
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    check_protocol,
    official_box_iou,
    official_synonym_score,
    parse_lines,
    parse_official_lines,
)
from .qa import QAQuestion, build_questions, negate_statement, parse_yes_no_answers
from .score import PancapScorer, format_table, overall_score, precision_recall_f1, summarize
