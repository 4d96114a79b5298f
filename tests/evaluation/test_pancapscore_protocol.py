"""The official PancapScore protocol, rule by rule, on minimal pairs.

Every expected value below was worked out by hand by following the authors' scorer
(``pancapscore/eval_tag_and_loc.py`` / ``eval_alldims.py``) line by line on the same input.
"""

import numpy as np
import pytest

from pix2cap.evaluation.pancapscore import (
    Entity,
    LinesExtractor,
    PancapScorer,
    StructuredJudge,
    WordNetSynonyms,
    match_entities,
    official_box_iou,
    official_synonym_score,
    parse_extraction,
    parse_official_lines,
    summarize,
)
from pix2cap.evaluation.pancapscore.matching import box_iou


def _names(content):
    return [(e.id, e.name) for e in content.entities]


def _ents(*names, boxes=None):
    boxes = boxes or [None] * len(names)
    return [Entity(id=k + 1, name=n, box=b) for k, (n, b) in enumerate(zip(names, boxes))]


def _scorer(protocol="official", embedder=None, synonyms=None):
    return PancapScorer(
        judge=StructuredJudge(),
        gt_extractor=LinesExtractor(protocol),
        pred_extractor=LinesExtractor(protocol),
        embedder=embedder,
        synonyms=synonyms,
        protocol=protocol,
    )


# ---------------------------------------------------------------- parsing


def test_official_parser_reads_what_the_lenient_one_drops():
    text = "\n".join(
        [
            "1 | entity -->> whole, dog",  # no parentheses: the last field is the name
            "2 | entity -->> (whole, brown, cat)",  # three fields: the last one
            "3 | entity -->> (whole, )",  # an empty name is a name
            "4 | location -->> (1, [0.1, 0.2, 0.3, 0.4])",  # a bare id refers to entity 1
            "5 | location -->> (entity 2, [0.9, 0.9, 0.1, 0.1])",  # any four floats
        ]
    )
    official = parse_official_lines(text)
    assert _names(official) == [(1, "dog"), (2, "cat"), (3, "")]
    assert official.entities[0].box == [0.1, 0.2, 0.3, 0.4]
    assert official.entities[1].box == [0.9, 0.9, 0.1, 0.1]
    assert official.malformed == 0
    lenient = parse_extraction(text)
    assert _names(lenient) == []  # every entity line is dropped, so every location too
    assert lenient.malformed == 5


def test_official_parser_rejects_what_the_lenient_one_reads():
    lines = [
        "1 | Entity -->> (whole, dog)",  # another case of the type word
        "2 | entity-->>(whole, cat)",  # another arrow spacing
        "- 3 | entity -->> (whole, cow)",  # a bullet
        "Entity 4 | entity -->> (whole, pig)",  # "Entity 4" as the ID
        "6 | location -->> (entity 5, [0.1, 0.1, 0.2, 0.2])",  # before its entity line
        "5 | entity -->> (whole, hen)",
        "7 | location -->> (entity 5, [0.1, 0.1, 0.2, 0.2]).",  # a trailing period
    ]
    official = parse_official_lines("\n".join(lines))
    assert _names(official) == [(5, "hen")]
    assert official.entities[0].box is None
    assert official.malformed == 6
    lenient = parse_extraction("\n".join(lines))
    assert _names(lenient) == [(1, "dog"), (2, "cat"), (3, "cow"), (5, "hen")]
    assert lenient.entities[-1].box == [0.1, 0.1, 0.2, 0.2]
    # A trailing period on an entity line is not stripped: it stays in the name.
    assert _names(parse_official_lines("1 | entity -->> (whole, dog).")) == [(1, "dog).")]


def test_official_duplicates_keep_the_last_and_quotes_do_not_protect_commas():
    text = "\n".join(
        [
            "1 | entity -->> (whole, dog)",
            "2 | entity -->> (whole, cat)",
            "3 | location -->> (entity 1, [0.0, 0.0, 0.5, 0.5])",
            "1 | entity -->> (whole, puppy)",
            "4 | location -->> (entity 1, [0.5, 0.5, 1.0, 1.0])",
            '5 | entity -->> (whole, "hot dog, grilled")',
        ]
    )
    official = parse_official_lines(text)
    # The renamed entity keeps its first place; its box is the last one given.
    assert _names(official) == [(1, "puppy"), (2, "cat"), (5, 'grilled"')]
    assert official.entities[0].box == [0.5, 0.5, 1.0, 1.0]
    lenient = parse_extraction(text)
    assert _names(lenient) == [(1, "dog"), (2, "cat"), (5, "hot dog, grilled")]
    assert lenient.entities[0].box == [0.0, 0.0, 0.5, 0.5]


def test_official_attribute_relation_and_global_acceptance():
    text = "\n".join(
        [
            "1 | entity -->> (whole, dog)",
            "2 | entity -->> (whole, ball)",
            '3 | attribute -->> (entity 1, "entity 1 is brown")',
            '4 | attribute -->> (entity 1, "the dog is brown")',  # names no entity: dropped
            '5 | attribute -->> (2, "it is red")',  # a bare id needs no mention
            '6 | attribute -->> (image, "it is sunny")',  # becomes a global item
            '7 | relation -->> (entity 1, entity 2, "entity 1 chases the ball")',  # first only
            '8 | relation -->> (1, 2, "entity 1 chases the ball")',  # bare ids: both needed
            '9 | global -->> ("calm, bright day")',
        ]
    )
    c = parse_official_lines(text)
    assert [(a.entity_id, a.text) for a in c.attributes] == [
        (1, "entity 1 is brown"),
        (2, "it is red"),
    ]
    assert [(r.entity_ids, r.text) for r in c.relations] == [((1, 2), "entity 1 chases the ball")]
    assert [g.text for g in c.global_items] == ["it is sunny", "calm, bright day"]
    assert c.malformed == 2


# ---------------------------------------------------------------- names and boxes


def test_official_names_are_identical_only_as_exact_strings():
    official = match_entities(_ents("Dog"), _ents("dog"))
    assert official.pairs == []
    lenient = match_entities(_ents("Dog"), _ents("dog "), protocol="lenient")
    assert lenient.pairs == [(1, 1)] and lenient.rules[(1, 1)] == "name"


def test_official_substring_rule_applies_without_wordnet():
    official = match_entities(_ents("dog"), _ents("brown dog"))
    assert official.pairs == [(1, 1)] and official.rules[(1, 1)] == "synonym"
    assert official_synonym_score("dog", "brown dog") == 1.0
    assert official_synonym_score("Dog", "brown dog") == 0.0  # case counts
    # The lenient protocol applies it only together with WordNet.
    assert match_entities(_ents("dog"), _ents("brown dog"), protocol="lenient").pairs == []
    # An empty name is a substring of every name.
    assert match_entities(_ents("dog"), _ents("")).pairs == [(1, 1)]


class _Lemma:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


class _Synset:
    def __init__(self, *lemmas):
        self._lemmas = [_Lemma(n) for n in lemmas]

    def lemmas(self):
        return self._lemmas

    def lemma_names(self):
        return [lemma.name() for lemma in self._lemmas]


class _FakeWordNet:
    """The two calls the scorers make of ``nltk.corpus.wordnet``."""

    NOUN = "n"
    SYNSETS = {
        "sofa": [_Synset("sofa", "couch", "lounge")],
        "couch": [_Synset("sofa", "couch", "lounge"), _Synset("couch")],
        "leather": [_Synset("leather")],
    }

    def __init__(self):
        self.calls = []

    def synsets(self, word, pos=None):
        self.calls.append((word, pos))
        return self.SYNSETS.get(word, [])


def test_official_wordnet_sets_are_built_word_by_word():
    wordnet = _FakeWordNet()
    # {leather, sofa, couch, lounge} vs {sofa, couch, lounge}: 3 / (4 + 1e-6).
    score = official_synonym_score("leather sofa", "couch", wordnet)
    assert score == pytest.approx(3 / (4 + 1e-6), abs=1e-12)
    assert ("leather", "n") in wordnet.calls and ("sofa", "n") in wordnet.calls
    m = match_entities(_ents("leather sofa"), _ents("couch"), synonyms=WordNetSynonyms(wordnet))
    assert m.pairs == [(1, 1)] and m.rules[(1, 1)] == "synonym"
    # The lenient scorer looks the whole name up ("leather_sofa"), which WordNet lacks.
    lenient = match_entities(
        _ents("leather sofa"), _ents("couch"), synonyms=WordNetSynonyms(_FakeWordNet()),
        protocol="lenient",
    )
    assert lenient.pairs == []


def test_official_box_iou_is_float32():
    a, b = [0.0, 0.0, 1.0, 0.006], [0.0, 0.0, 1.0, 0.003]  # IoU 1/2 in exact arithmetic
    assert box_iou(a, b) < 0.5  # float64: 0.49999999999999994
    assert official_box_iou(a, b) >= 0.5  # float32: 0.50000006
    official = match_entities(_ents("dog", boxes=[a]), _ents("dog", boxes=[b]))
    assert official.location_hits == [(1, 1)]
    lenient = match_entities(_ents("dog", boxes=[a]), _ents("dog", boxes=[b]), protocol="lenient")
    assert lenient.pairs == [(1, 1)] and lenient.location_hits == []
    # No order check: a reversed box has a positive "area" (-w * -h) in the official IoU.
    assert official_box_iou([0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]) == 0.0
    assert official_box_iou(None, b) == 0.0


# ---------------------------------------------------------------- scores and averaging


GT = "\n".join(
    [
        "1 | entity -->> (whole, dog)",
        "2 | entity -->> (whole, cat)",
        "3 | entity -->> (whole, tree)",
        "4 | location -->> (entity 1, [0.0, 0.0, 0.5, 0.5])",
        "5 | location -->> (entity 2, [0.5, 0.5, 1.0, 1.0])",
    ]
)
PRED = "\n".join(
    [
        "1 | entity -->> (whole, dog)",
        "2 | entity -->> (whole, Cat)",  # not identical to "cat", no substring either way
        "3 | location -->> (entity 1, [0.0, 0.0, 0.5, 0.5])",
    ]
)


def test_official_entity_and_location_f1_on_one_pair():
    r = _scorer().score_image(GT, PRED)
    # E: 1 pair (dog); recall 1/3, precision 1/2 -> F1 2/5.
    assert r["E"] == pytest.approx(40.0)
    # L: 1 hit; recall 1/2 gt boxes, precision 1/1 -> F1 2/3.
    assert r["L"] == pytest.approx(200 / 3)
    # A, R, G: no item on either side -> 0 each, and Overall is defined.
    assert (r["A"], r["R"], r["G"]) == (0.0, 0.0, 0.0)
    assert r["Overall"] == pytest.approx(40.0 + 200 / 3)
    assert r["protocol"] == "official" and r["official_code_crash"] is None
    lenient = _scorer("lenient").score_image(GT, PRED)
    assert lenient["E"] == pytest.approx(80.0)  # Cat == cat: recall 2/3, precision 1
    assert lenient["A"] is None and lenient["Overall"] is None


def test_official_empty_sides_score_zero_and_count_in_the_mean():
    boxed = "1 | entity -->> (whole, dog)\n2 | location -->> (entity 1, [0.0, 0.0, 0.5, 0.5])"
    unboxed = "1 | entity -->> (whole, dog)"
    official = _scorer()
    images = [official.score_image(boxed, boxed), official.score_image(unboxed, unboxed)]
    assert [r["L"] for r in images] == [100.0, 0.0]  # no box on either side: 0, not None
    assert official.score_image(boxed, unboxed)["L"] == 0.0  # prediction without boxes
    mean = summarize(images)
    assert mean["L"] == 50.0 and mean["num_defined"]["L"] == 2
    assert mean["Overall"] == pytest.approx(100.0 + 50.0)
    lenient = _scorer("lenient")
    mean = summarize([lenient.score_image(boxed, boxed), lenient.score_image(unboxed, unboxed)])
    assert mean["L"] == 100.0 and mean["num_defined"]["L"] == 1


def test_where_the_official_code_crashes_the_values_are_defined_and_counted():
    scorer = _scorer()
    dog = "1 | entity -->> (whole, dog)"
    no_gt = scorer.score_image("", dog)
    no_pred = scorer.score_image(dog, "")
    neither = scorer.score_image("", "")
    assert [r["E"] for r in (no_gt, no_pred, neither)] == [0.0, 0.0, 0.0]
    assert [r["official_code_crash"] for r in (no_gt, no_pred, neither)] == [
        "no_gt_entities",
        "no_pred_entities",
        "no_entities",
    ]
    assert all(r["Overall"] == 0.0 for r in (no_gt, no_pred, neither))
    mean = summarize([no_gt, no_pred, neither, scorer.score_image(dog, dog)])
    assert mean["num_images"] == 4 and mean["E"] == 25.0
    assert mean["official_code_crashes"] == {
        "no_entities": 1,
        "no_gt_entities": 1,
        "no_pred_entities": 1,
    }
    assert mean["protocol"] == "official"


def test_every_result_names_its_protocol_and_protocols_do_not_mix():
    official, lenient = _scorer(), _scorer("lenient")
    assert official.setup.as_dict()["protocol"] == "official"
    assert lenient.setup.as_dict()["protocol"] == "lenient"
    assert "lenient protocol" in lenient.setup.approximation_note
    with pytest.raises(ValueError, match="different protocols"):
        summarize([official.score_image(GT, PRED), lenient.score_image(GT, PRED)])
    with pytest.raises(ValueError, match="reads lines by the 'lenient' protocol"):
        PancapScorer(StructuredJudge(), LinesExtractor("lenient"), LinesExtractor(), protocol="official")
    with pytest.raises(ValueError, match="unknown PancapScore protocol"):
        LinesExtractor("strict")


def test_official_embedding_rule_pairs_names_whose_cosine_reaches_half():
    class _Embedder:
        name = "fake"

        def __call__(self, texts):
            vectors = {"hound": [1.0, 0.0], "canine": [0.6, 0.8], "car": [0.0, 1.0]}
            return np.array([vectors[t] for t in texts])

    m = match_entities(_ents("hound"), _ents("car", "canine"), embedder=_Embedder())
    assert m.pairs == [(1, 2)] and m.rules[(1, 2)] == "embedding"  # cosine 0.6; car: 0
