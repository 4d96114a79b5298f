import json
import re
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pix2cap.data.caption_formats import format_box, parse_pancap_boxes
from pix2cap.evaluation.pancapscore import (
    Entity,
    HeuristicExtractor,
    LLMExtractor,
    PancapScorer,
    PanopticContent,
    StructuredJudge,
    build_extractor,
    build_judge,
    build_questions,
    match_entities,
    negate_statement,
    overall_score,
    parse_extraction,
    parse_yes_no_answers,
    rewrite_entity_refs,
    summarize,
)
from pix2cap.evaluation.pancapscore.qa import score_answers

OFFICIAL_EXAMPLE = """\
1 | entity -->> (whole, motorcycle)
4 | entity -->> (whole, road)
6 | location -->> (entity 1, [0.50, 0.70, 0.83, 1.00])
9 | attribute -->> (entity 1, "entity 1 is blue")
15 | relation -->> (entity 1, entity 4, "entity 1 is next to entity 4")
21 | global -->> ("the scene feels tranquil")
"""


# ---------------------------------------------------------------- content parsing


def test_parse_extraction_official_lines():
    c = parse_extraction(OFFICIAL_EXAMPLE)
    assert c.malformed == 0
    assert [(e.id, e.name, e.kind) for e in c.entities] == [
        (1, "motorcycle", "whole"),
        (4, "road", "whole"),
    ]
    assert c.entities[0].box == [0.5, 0.7, 0.83, 1.0]
    assert c.entities[1].box is None
    assert [(a.entity_id, a.text) for a in c.attributes] == [(1, "entity 1 is blue")]
    assert [(r.entity_ids, r.text) for r in c.relations] == [
        ((1, 4), "entity 1 is next to entity 4")
    ]
    assert [g.text for g in c.global_items] == ["the scene feels tranquil"]
    # Rendering and parsing again keeps everything.
    again = parse_extraction(c.to_lines())
    assert again.malformed == 0
    assert again.to_dict() == c.to_dict()


def test_parse_extraction_counts_garbage_without_raising():
    text = "\n".join(
        [
            "Sure! Here is the extraction:",  # chatter: malformed
            "```",  # fence: ignored
            "",  # blank: ignored
            "1 | entity -->> (whole, dog)",
            "2 | entity -->> (whole, dog",  # unbalanced tuple
            "3 | colour -->> (entity 1, red)",  # unknown type
            '4 | attribute -->> (entity 99, "entity 99 is red")',  # undeclared entity
            "5 | location -->> (entity 1, [0.1, 0.2])",  # 2 numbers
            "6 | location -->> (entity 1, [0.1, 0.2, 0.3, 0.4])",
            "7 | location -->> (entity 1, [0.5, 0.5, 0.6, 0.6])",  # second box
            "8 | location -->> (entity 1, [0.9, 0.2, 0.3, 0.4])",  # x1 > x2
            '9 | attribute -->> (entity 1, "a dog, brown and happy")',  # comma inside quotes
            '1 | entity -->> (whole, cat)',  # duplicate entity id
            "10 | global -->> ()",  # empty tuple
            "\u2603 | \u2603 -->> \u2603",
            "```",
        ]
    )
    c = parse_extraction(text)
    assert [e.name for e in c.entities] == ["dog"]
    assert c.entities[0].box == [0.1, 0.2, 0.3, 0.4]
    assert [a.text for a in c.attributes] == ["a dog, brown and happy"]
    assert c.malformed == 10
    assert parse_extraction(None).malformed == 1
    assert parse_extraction("").malformed == 0


def test_structured_dict_form_and_errors():
    c = PanopticContent.from_dict(
        {
            "entities": [{"id": 1, "name": "dog", "box": [0, 0, 0.5, 0.5]}, {"id": 2, "name": "sofa"}],
            "attributes": [{"entity": 1, "text": "brown"}],
            "relations": [{"entities": [1, 2], "text": "is on"}],
            "global": ["a cosy room"],
        }
    )
    assert c.attributes[0].text == "entity 1 is brown"
    assert c.relations[0].text == "entity 1 is on entity 2"
    assert c.entities[1].box is None
    with pytest.raises(ValueError, match=r"pred\.entities\[0\]\.box"):
        PanopticContent.from_dict({"entities": [{"id": 1, "name": "x", "box": [1, 2]}]}, "pred")
    with pytest.raises(ValueError, match=r"attributes\[0\]\.entity: no entity with id 3"):
        PanopticContent.from_dict(
            {"entities": [{"id": 1, "name": "x"}], "attributes": [{"entity": 3, "text": "red"}]}
        )
    with pytest.raises(ValueError, match="used twice"):
        PanopticContent.from_dict({"entities": [{"id": 1, "name": "x"}, {"id": 1, "name": "y"}]})


def test_rewrite_entity_refs_swaps_in_one_pass():
    assert rewrite_entity_refs("entity 1 is left of entity 2", {1: 2, 2: 1}) == (
        "entity 2 is left of entity 1"
    )
    assert rewrite_entity_refs("entity 10 near entity 1", {1: 5}) == "entity 10 near entity 5"


# ---------------------------------------------------------------- entity matching


def _ents(*names, boxes=None):
    boxes = boxes or [None] * len(names)
    return [Entity(id=i + 1, name=n, box=b) for i, (n, b) in enumerate(zip(names, boxes))]


class _FakeEmbedder:
    """Unit vectors chosen so that cos("anchor", name) is exactly the given value; names
    not listed get vectors orthogonal to everything else."""

    name = "fake"

    def __init__(self, cosines):
        self.cosines = cosines

    def __call__(self, texts):
        out = np.zeros((len(texts), 2 + len(texts)))
        for k, t in enumerate(texts):
            if t == "anchor":
                out[k, 0] = 1.0
            elif t in self.cosines:
                c = self.cosines[t]
                out[k, :2] = [c, math.sqrt(1 - c * c)]
            else:
                out[k, 2 + k] = 1.0
        return out


def test_exact_names_beat_everything_and_pair_one_to_one():
    # The lenient protocol compares names after case and space normalisation.
    m = match_entities(_ents("Dog", "cat"), _ents("cat", "dog "), protocol="lenient")
    assert sorted(m.pairs) == [(1, 2), (2, 1)]
    assert set(m.rules.values()) == {"name"}
    # The official one compares exact strings, case included.
    m = match_entities(_ents("Dog", "cat"), _ents("cat", "dog "))
    assert m.pairs == [(2, 1)] and m.rules[(2, 1)] == "name"


def test_synonym_rule_with_fake_provider():
    synonyms = lambda a, b: 0.5 if {a, b} == {"sofa", "couch"} else 0.0  # noqa: E731
    m = match_entities(_ents("sofa", "lamp"), _ents("couch", "tree"), synonyms=synonyms)
    assert m.pairs == [(1, 1)]
    assert m.rules[(1, 1)] == "synonym"
    # Without the provider (WordNet unavailable) the pair is not made.
    assert match_entities(_ents("sofa"), _ents("couch")).pairs == []


def test_embedding_threshold_is_half():
    emb = _FakeEmbedder({"above": 0.51, "below": 0.49})
    assert match_entities(_ents("anchor"), _ents("above"), embedder=emb).pairs == [(1, 1)]
    assert match_entities(_ents("anchor"), _ents("below"), embedder=emb).pairs == []
    # Two candidates: the closer one wins.
    emb = _FakeEmbedder({"near": 0.9, "far": 0.6})
    m = match_entities(_ents("anchor"), _ents("far", "near"), embedder=emb)
    assert m.pairs == [(1, 2)] and m.rules[(1, 2)] == "embedding"


def test_no_match_leaves_entities_unpaired():
    emb = _FakeEmbedder({})
    m = match_entities(_ents("dog", "car"), _ents("skyscraper"), embedder=emb)
    assert m.pairs == [] and m.num_gt == 2 and m.num_pred == 1
    assert match_entities([], _ents("dog")).pairs == []


def test_location_hit_needs_iou_of_half():
    full = [0.0, 0.0, 1.0, 1.0]
    above = [0.0, 0.0, 1.0, 0.51]  # IoU 0.51 with the full box
    below = [0.0, 0.0, 1.0, 0.49]  # IoU 0.49
    m = match_entities(_ents("dog", boxes=[full]), _ents("dog", boxes=[above]))
    assert m.location_hits == [(1, 1)]
    m = match_entities(_ents("dog", boxes=[full]), _ents("dog", boxes=[below]))
    assert m.pairs == [(1, 1)] and m.location_hits == []
    # With equal names the box bonus decides which pairs are made.
    left, right = [0.0, 0.0, 0.4, 1.0], [0.6, 0.0, 1.0, 1.0]
    m = match_entities(_ents("dog", "dog", boxes=[left, right]), _ents("dog", "dog", boxes=[right, left]))
    assert sorted(m.pairs) == [(1, 2), (2, 1)] and len(m.location_hits) == 2


# ---------------------------------------------------------------- QA


def test_negation_rule():
    assert negate_statement("entity 1 is blue") == "entity 1 is not blue"
    assert negate_statement("entity 2 has a handle.") == "entity 2 does not have a handle"
    assert negate_statement("entity 1 is not blue") == "it is not the case that entity 1 is not blue"
    assert negate_statement("the sun shines") == "it is not the case that the sun shines"


def test_questions_are_rewritten_and_unmatched_items_score_zero():
    gt = parse_extraction(OFFICIAL_EXAMPLE)
    questions, slots = build_questions(gt, {1: 7})  # road (4) unmatched
    assert slots["relation"] == [None]
    assert [q.text for q in questions[:2]] == [
        "Is it true that entity 7 is blue?",
        "Is it true that entity 7 is not blue?",
    ]
    assert [q.expected for q in questions] == [True, False, True, False]
    result = score_answers(questions, slots, [True, True, True, False], malformed=0)
    assert result.scores == {"attribute": [0.5], "relation": [0.0], "global": [1.0]}
    assert result.unanswerable["relation"] == 1


def test_answer_parser_survives_garbage():
    assert parse_yes_no_answers("1. yes\n2: No\nthree. maybe", 3) == ([True, False, None], 1)
    assert parse_yes_no_answers("- **Q2**: yes\n* 1) answer: no", 2) == ([False, True], 0)
    assert parse_yes_no_answers("yes no", 2) == ([True, False], 0)
    assert parse_yes_no_answers("yes", 2) == ([None, None], 2)
    assert parse_yes_no_answers("1. yes\n1. no\n9. yes", 1) == ([None], 1)
    assert parse_yes_no_answers("\x00\x01%%%", 2) == ([None, None], 2)
    assert parse_yes_no_answers(None, 2) == ([None, None], 2)


def test_structured_judge_supports_contradicts_and_reverses():
    cand = PanopticContent.from_dict(
        {
            "entities": [{"id": 5, "name": "circle"}, {"id": 6, "name": "square"}],
            "attributes": [{"entity": 5, "text": "red"}],
            "relations": [{"entities": [6, 5], "text": "is to the right of"}],
            "global": ["a synthetic scene"],
        }
    )
    ref = PanopticContent.from_dict(
        {
            "entities": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
            "attributes": [{"entity": 1, "text": "red"}, {"entity": 1, "text": "blue"},
                           {"entity": 2, "text": "large"}],
            "relations": [{"entities": [1, 2], "text": "is to the left of"}],
            "global": ["A synthetic scene.", "a rainy day"],
        }
    )
    questions, slots = build_questions(ref, {1: 5, 2: 6})
    answers, bad = StructuredJudge().answer(questions, cand)
    result = score_answers(questions, slots, answers, bad)
    # red: supported (1); blue: contradicted by red (0); large: unknown (0.5).
    assert result.scores["attribute"] == [1.0, 0.0, 0.5]
    # "circle left of square" == "square right of circle".
    assert result.scores["relation"] == [1.0]
    assert result.scores["global"] == [1.0, 0.5]


# ---------------------------------------------------------------- scores


def test_overall_reproduces_published_row():
    assert round(overall_score(52.06, 10.03, 36.88, 25.90, 76.78), 2) == 132.55
    row = {"E": 52.06, "L": 10.03, "A": 36.88, "R": 25.90, "G": 76.78}
    per_image = [
        {
            **row,
            "Overall": None,
            "dimensions": {
                n: {"precision": None, "recall": None, "f1": None}
                for n in ("entity", "location", "attribute", "relation", "global")
            },
            "malformed": {"gt_extraction": 0, "pred_extraction": 0, "judge_answers": 0},
        }
    ]
    assert round(summarize(per_image)["Overall"], 2) == 132.55


SHAPES_CAPTION = (
    "This image is a simple synthetic scene. Grey wall [[0.000, 0.000, 1.000, 0.453]] covers the "
    "top of the image, and dark blue water [[0.000, 0.406, 1.000, 1.000]] covers the bottom. "
    "A small red dotted star [[0.750, 0.469, 0.906, 0.625]] is to the right of the orange "
    "circle [[0.062, 0.531, 0.406, 0.891]]. A large orange dotted circle [[0.062, 0.531, 0.406, "
    "0.891]] is in front of the wall [[0.000, 0.000, 1.000, 0.453]]. Overall the picture shows "
    "two objects drawn in flat vivid colours."
)


def test_heuristic_extractor_on_shapes_caption():
    c = HeuristicExtractor().extract(SHAPES_CAPTION)
    assert c.malformed == 0
    assert [e.name for e in c.entities] == ["wall", "water", "star", "circle"]
    unique_boxes = {tuple(b["box"]) for b in parse_pancap_boxes(SHAPES_CAPTION)}
    assert {tuple(e.box) for e in c.entities} == unique_boxes
    attrs = {a.text for a in c.attributes}
    assert {"entity 1 is grey", "entity 2 is dark blue", "entity 3 is small", "entity 3 is red",
            "entity 4 is orange", "entity 4 is large"} <= attrs
    assert [r.text for r in c.relations] == [
        "entity 3 is to the right of entity 4",
        "entity 4 is in front of entity 1",
    ]
    assert [g.text for g in c.global_items] == [
        "Overall the picture shows two objects drawn in flat vivid colours"
    ]


def test_heuristic_extractor_on_generated_shapes_scene():
    from pix2cap.data.datasets.shapes import render_scene

    scene = render_scene(np.random.default_rng(3), 48)
    c = HeuristicExtractor().extract(scene.panoptic_caption)
    boxes = {tuple(b["box"]) for b in parse_pancap_boxes(scene.panoptic_caption)}
    assert len(c.entities) == len(boxes) and c.malformed == 0
    names = {e.name for e in c.entities}
    assert names <= {"circle", "square", "triangle", "star", "sky", "wall", "grass", "water", "sand"}
    assert c.global_items and c.relations


def _scorer(judge=None, embedder=None):
    return PancapScorer(
        judge=judge or StructuredJudge(),
        gt_extractor=HeuristicExtractor(),
        pred_extractor=build_extractor("heuristic"),
        embedder=embedder,
    )


def test_scorer_perfect_empty_and_labelled_approximate():
    scorer = _scorer()
    same = scorer.score_image(SHAPES_CAPTION, SHAPES_CAPTION)
    assert [same[k] for k in "ELARG"] == [100.0] * 5 and same["Overall"] == 410.0
    empty = scorer.score_image(SHAPES_CAPTION, "")
    assert [empty[k] for k in "ELARG"] == [0.0] * 5
    # A prediction that moved one box and lost one attribute.
    changed = SHAPES_CAPTION.replace("[[0.750, 0.469, 0.906, 0.625]]", format_box([0.1, 0.1, 0.2, 0.2]))
    changed = changed.replace("small red dotted star", "red dotted star")
    partial = scorer.score_image(SHAPES_CAPTION, changed)
    assert partial["E"] == 100.0 and partial["L"] == pytest.approx(75.0)
    assert 0 < partial["A"] < 100.0
    setup = scorer.setup.as_dict()
    assert setup["official"] is False and setup["wordnet"] == "unavailable"
    assert "APPROXIMATION" in setup["approximation_note"]
    assert setup["extractor"] == {"gt": "heuristic", "pred": "heuristic"}
    # Broken box groups never leak into global statements.
    broken = HeuristicExtractor().extract(SHAPES_CAPTION + " Calm [[bad]] water [[1, 2]].")
    assert broken.global_items[-1].text == "Calm water"


def test_official_flag_only_for_full_llm_setup():
    class _LLM:
        name, is_llm, stats = "llm", True, {}

        def describe(self):
            return "llm"

        def complete(self, prompt, max_new_tokens=None):
            return ""

    class _Embedder:
        name = "all-mpnet-base-v2"

        def __call__(self, texts):
            return np.ones((len(texts), 2))

    judge = _LLM()
    official = PancapScorer(judge, LLMExtractor(judge), LLMExtractor(judge), embedder=_Embedder(),
                            synonyms=lambda a, b: 0.0)
    assert official.setup.official is True
    no_wordnet = PancapScorer(judge, LLMExtractor(judge), LLMExtractor(judge), embedder=_Embedder())
    assert no_wordnet.setup.official is False
    lenient = PancapScorer(judge, LLMExtractor(judge, protocol="lenient"),
                           LLMExtractor(judge, protocol="lenient"), embedder=_Embedder(),
                           synonyms=lambda a, b: 0.0, protocol="lenient")
    assert lenient.setup.official is False and lenient.setup.protocol == "lenient"
    with pytest.raises(ValueError, match="language-model judge"):
        LLMExtractor(StructuredJudge())


# ---------------------------------------------------------------- judges over HTTP / HF


class _ChatHandler(BaseHTTPRequestHandler):
    """Answers every numbered question "yes"; the first request gets a 503 (retry test);
    requests for model "garbage" get a non-JSON body."""

    calls = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                 "body": body})
        if len(type(self).calls) == 1:
            self.send_response(503)
            self.end_headers()
            return
        if body["model"] == "garbage":
            payload = b"<html>not json"
        else:
            prompt = body["messages"][-1]["content"]
            listing = prompt.split("Questions:\n", 1)[-1]
            n = sum(1 for line in listing.splitlines() if line[:1].isdigit())
            reply = "\n".join(f"{k + 1}. yes" for k in range(n))
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _ChatHandler.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_openai_http_judge_against_local_server(chat_server, monkeypatch):
    monkeypatch.setenv("PANCAP_TEST_KEY", "secret")
    judge = build_judge("openai_http", base_url=chat_server, model="m", api_key_env="PANCAP_TEST_KEY",
                        timeout=5, retries=2, backoff=0.01, batch_size=3)
    questions, slots = build_questions(parse_extraction(OFFICIAL_EXAMPLE), {1: 1, 4: 4})
    answers, bad = judge.answer(questions, parse_extraction(OFFICIAL_EXAMPLE))
    assert answers == [True] * 6 and bad == 0
    calls = _ChatHandler.calls
    assert len(calls) == 3  # one 503, then two batches of 3
    assert calls[1]["path"] == "/v1/chat/completions" and calls[1]["auth"] == "Bearer secret"
    assert calls[1]["body"]["temperature"] == 0
    # A server that answers garbage: counted, never raised.
    bad_judge = build_judge("openai_http", base_url=chat_server + "/v1", model="garbage",
                            api_key_env=None, timeout=5, retries=0)
    answers, bad = bad_judge.answer(questions, parse_extraction(OFFICIAL_EXAMPLE))
    assert answers == [None] * 6 and bad == 6
    assert bad_judge.stats["malformed_responses"] == 1
    # Nobody listening: a failed request, not an exception.
    dead = build_judge("openai_http", base_url="http://127.0.0.1:9", model="m", timeout=1,
                       retries=0)
    assert dead.complete("hi") == "" and dead.stats["failed_requests"] == 1


def test_hf_local_judge_with_tiny_random_model(tmp_path):
    import torch
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    from pix2cap.evaluation.pancapscore import default_embedder_path

    torch.manual_seed(0)
    tokenizer = BertTokenizerFast.from_pretrained(default_embedder_path(), local_files_only=True)
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    judge = build_judge("hf_local", model=str(tmp_path), device="cpu", batch_size=4,
                        max_new_tokens=16)
    content = parse_extraction(OFFICIAL_EXAMPLE)
    questions, _ = build_questions(content, {1: 1, 4: 4})
    answers, bad = judge.answer(questions, content)
    assert len(answers) == 6 and bad == sum(a is None for a in answers)
    extracted = LLMExtractor(judge, max_new_tokens=16).extract(SHAPES_CAPTION)
    assert isinstance(extracted, PanopticContent)
    assert judge.stats["calls"] == 3 and judge.stats["failed_requests"] == 0
    # A tokenizer with a chat template is prompted through it.
    judge.tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert judge._encode("hi")[:3] == tokenizer("[hi]", add_special_tokens=False)["input_ids"][:3]
    assert isinstance(judge.complete("hi", max_new_tokens=4), str)
    with pytest.raises(FileNotFoundError, match="local model folder"):
        build_judge("hf_local", model=str(tmp_path / "missing"))


# ---------------------------------------------------------------- real embedder + CLI


@pytest.fixture(scope="module")
def minilm():
    from pix2cap.evaluation.pancapscore import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(device="cpu")


def test_minilm_embedder_cosines(minilm):
    from pix2cap.evaluation.pancapscore.matching import cosine_matrix

    sim = cosine_matrix(minilm, ["dog"], ["puppy", "skyscraper"])
    assert sim[0, 0] > 0.5 > sim[0, 1]
    m = match_entities(_ents("dog"), _ents("puppy"), embedder=minilm)
    assert m.rules == {(1, 1): "embedding"}


def _cli(minilm, monkeypatch):
    """tools/eval_pancapscore.py as a module, its embedder the already loaded MiniLM."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "eval_pancapscore",
        os.path.join(os.path.dirname(__file__), "..", "..", "tools", "eval_pancapscore.py"),
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # The CLI builds its own embedder; reuse the loaded one to keep the test fast.
    monkeypatch.setattr(tool, "SentenceTransformerEmbedder", lambda *a, **k: minilm)
    return tool


def test_cli_end_to_end(tmp_path, minilm, monkeypatch, capsys):
    tool = _cli(minilm, monkeypatch)

    structured = HeuristicExtractor().extract(SHAPES_CAPTION).to_dict()
    gt = [{"image_path": "sam/a.jpg", "gt_response": SHAPES_CAPTION},
          {"image_path": "sam/b.jpg", "gt_response": SHAPES_CAPTION}]
    pred = [{"image_path": "sam/a.jpg", "model_response": "", "structured": structured},
            {"image_path": "sam/c.jpg", "model_response": "nothing"}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    out = tmp_path / "out" / "score.json"
    result = tool.main(["--pred", str(tmp_path / "pred.json"), "--gt", str(tmp_path / "gt.json"),
                        "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["mean"] == json.loads(json.dumps(result["mean"]))
    a, b = saved["per_image"]
    assert a["Overall"] == 410.0 and b["Overall"] == 0.0
    assert saved["mean"]["Overall"] == pytest.approx(205.0)
    assert saved["missing_predictions"] == ["sam/b.jpg"]
    assert saved["unmatched_predictions"] == ["sam/c.jpg"]
    assert saved["setup"]["official"] is False
    assert saved["setup"]["embedder"] == "all-MiniLM-L6-v2"
    assert "Overall" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps([{"image_path": "x"}]))
    with pytest.raises(SystemExit, match="no key 'gt_response'"):
        tool.main(["--pred", str(tmp_path / "pred.json"), "--gt", str(tmp_path / "bad.json"),
                   "--output", str(out)])


def test_cli_scores_official_content_files_on_identical_lines(tmp_path, minilm, monkeypatch, capsys):
    """Extraction lines in, by both protocols: official E/L follow the authors' rules."""
    tool = _cli(minilm, monkeypatch)
    gt_lines = "1 | entity -->> (whole, dog)\n2 | location -->> (entity 1, [0.0, 0.0, 0.5, 0.5])"
    # A duplicate id: the official reading keeps the last name (dog), the lenient the first.
    pred_lines = "1 | entity -->> (whole, skyscraper)\n1 | entity -->> (whole, dog)"
    (tmp_path / "gt.json").write_text(json.dumps([{"image_path": "a.jpg", "all_content": gt_lines}]))
    (tmp_path / "pred.json").write_text(
        json.dumps([{"image_path": "a.jpg", "all_content": pred_lines}])
    )
    args = ["--pred", str(tmp_path / "pred.json"), "--gt", str(tmp_path / "gt.json"),
            "--gt-key", "all_content", "--pred-key", "all_content",
            "--extractor", "lines", "--gt-extractor", "lines"]
    official = tool.main(args + ["--output", str(tmp_path / "official.json")])
    assert official["protocol"] == "official" and official["setup"]["protocol"] == "official"
    assert official["mean"]["E"] == 100.0 and official["mean"]["L"] == 0.0
    assert "PancapScore (official protocol)" in capsys.readouterr().out
    lenient = tool.main(args + ["--protocol", "lenient", "--output", str(tmp_path / "l.json")])
    assert lenient["mean"]["E"] == 0.0  # skyscraper is not a dog
    assert lenient["mean"]["L"] == 0.0 and lenient["mean"]["num_defined"]["L"] == 1


def test_cli_reads_a_pancapchain_folder(tmp_path, minilm, monkeypatch):
    from PIL import Image

    tool = _cli(minilm, monkeypatch)
    (tmp_path / "sam").mkdir()
    Image.new("RGB", (100, 100)).save(tmp_path / "sam" / "a.jpg")
    folder = tmp_path / "pred"
    folder.mkdir()
    # The ground truth's own caption with its boxes on PancapChain's grid (a square image:
    # no padding, grid / 1000).
    grid_caption = re.sub(
        r"\[\[([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\]\]",
        lambda m: "<box>[[" + ", ".join(str(round(float(v) * 1000)) for v in m.groups()) + "]]</box>",
        SHAPES_CAPTION,
    )
    (folder / "a.json").write_text(json.dumps({"image": "sam/a.jpg", "text": grid_caption}))
    (tmp_path / "gt.json").write_text(
        json.dumps([{"image_path": "sam/a.jpg", "gt_response": SHAPES_CAPTION}])
    )
    out = tmp_path / "score.json"
    result = tool.main(["--pancapchain-dir", str(folder), "--image-root", str(tmp_path),
                        "--gt", str(tmp_path / "gt.json"), "--output", str(out)])
    assert result["per_image"][0]["Overall"] == pytest.approx(410.0)
    assert result["missing_predictions"] == [] and result["unmatched_predictions"] == []
    with pytest.raises(SystemExit, match="needs --image-root"):
        tool.main(["--pancapchain-dir", str(folder), "--gt", str(tmp_path / "gt.json"),
                   "--output", str(out)])


def test_an_image_whose_judge_cannot_be_reached_is_skipped_and_counted():
    from pix2cap.evaluation.pancapscore import LLMJudge

    class FlakyJudge(LLMJudge):
        name = "flaky"

        def __init__(self):
            super().__init__(batch_size=4)
            self.down = False

        def _complete(self, prompt, max_new_tokens):
            if self.down:
                raise ConnectionError("the judge server is unreachable")
            listing = prompt.split("Questions:\n", 1)[-1]
            n = sum(1 for line in listing.splitlines() if line[:1].isdigit())
            return "\n".join(f"{k + 1}. yes" for k in range(n))

    judge = FlakyJudge()
    scorer = PancapScorer(judge, HeuristicExtractor(), HeuristicExtractor())
    reached = scorer.score_image(SHAPES_CAPTION, SHAPES_CAPTION, image_path="a")
    judge.down = True
    lost = scorer.score_image(SHAPES_CAPTION, SHAPES_CAPTION, image_path="b")
    # A judge that says yes to everything gets the negated questions wrong: A, R, G at 50.
    assert "skipped" not in reached and reached["Overall"] == pytest.approx(305.0)
    # Scored as usual the questions would all be wrong; the image is left out instead.
    assert lost["skipped"] is True and lost["judge_failed_requests"] >= 1
    mean = summarize([reached, lost])
    assert mean["num_images"] == 1 and mean["skipped_images"] == 1
    assert mean["Overall"] == pytest.approx(305.0)
