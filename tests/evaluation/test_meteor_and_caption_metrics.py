"""The batched METEOR scorer and the caption metrics against pycocoevalcap's reference path.

Needs java (METEOR and the PTB tokenizer are jars). Loading METEOR's paraphrase table takes
10-30 s of CPU, so the module starts one JVM and shares it.
"""

import contextlib
import io
import shutil

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("java") is None, reason="METEOR and the PTB tokenizer need java"
)

PAIRS = [
    ("a red circle on the left", "a red circle on the left side of the image"),
    ("a big brown dog", "a blue square"),
    ("the cats are running in the grass", "a cat runs fast through green grass"),
    ("green grass covers the bottom", "green grass covers the bottom of the picture"),
    ("a triangle above a square", "a yellow triangle is above the blue square"),
    ("The SKY, clear and blue!", "the blue sky is clear"),
    ("a small striped circle", "a small circle with stripes"),
    ("two squares next to each other", "two red squares side by side"),
    ("sand", "sandy ground at the bottom"),
    ("a purple circle|||with\nbreaks", "a purple circle"),
]


@pytest.fixture(scope="module")
def scorers():
    """Our scorer, and pycocoevalcap's ``Meteor`` driving the *same* java process: the
    reference protocol code runs unchanged, and the test pays for one JVM start, not two."""
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    from pix2cap.evaluation.meteor import MeteorScorer

    class SharedMeteor(Meteor):
        def __init__(self, process):  # pycocoevalcap's own compute_score over our process
            self.meteor_p = process
            self.lock = threading.Lock()

        def __del__(self):  # the process belongs to ``ours``
            pass

    ours = MeteorScorer()
    reference = SharedMeteor(ours._proc)
    yield ours, reference
    ours.close()


def test_batched_meteor_equals_pycocoevalcap_per_pair(scorers):
    ours, reference = scorers
    clean = [(c.lower().replace("|||", " ").replace("\n", " "), [r]) for c, r in PAIRS]
    gts = {i: refs for i, (_, refs) in enumerate(clean)}
    res = {i: [c] for i, (c, _) in enumerate(clean)}
    ref_corpus, ref_scores = reference.compute_score(gts, res)
    scores = ours.score([(c, [r]) for c, r in PAIRS])
    assert len(scores) == len(PAIRS)
    assert scores == pytest.approx(ref_scores, abs=1e-9)
    assert 0.0 < min(scores[:1]) and scores[1] < scores[0]
    corpus, per_pair = ours.score_corpus([(c, [r]) for c, r in PAIRS])
    assert corpus == pytest.approx(ref_corpus, abs=1e-9)
    assert per_pair == pytest.approx(ref_scores, abs=1e-9)
    # Many pairs in one call, references lists of any length, empty input.
    many = ours.score([(c, [r, "a thing"]) for c, r in PAIRS] * 50)
    assert len(many) == 500 and many[:10] == many[10:20]
    assert ours.score([]) == []


def test_caption_metrics_equal_reference_way(scorers):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from pix2cap.evaluation.densecap_evaluation import caption_metrics

    ours, reference = scorers
    gts = {i: [{"caption": g}] for i, (_, g) in enumerate(PAIRS)}
    res = {i: [{"caption": p}] for i, (p, _) in enumerate(PAIRS)}
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        expected = {
            "BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
            "METEOR": reference.compute_score(gts, res)[0],
            "ROUGE-L": Rouge().compute_score(gts, res)[0],
            "CIDEr": Cider().compute_score(gts, res)[0],
        }

    got = caption_metrics(PAIRS, total=20, meteor=ours)
    for name, value in expected.items():
        assert got[name] == pytest.approx(100.0 * value, abs=1e-7), name
        assert got[f"{name}_pix2cap_scaled"] == pytest.approx(100.0 * value * 10 / 20), name
    assert got["num_pairs"] == 10
    assert got["CIDEr"] > 0
    assert "SPICE" not in got and "SPICE" in got["skipped"]
    assert "CoreNLP" in got["skipped"]["SPICE"]
    assert "CAPTURE" in got["skipped"]

    empty = caption_metrics([], total=5)
    assert empty["BLEU-4_pix2cap_scaled"] == 0.0 and "BLEU-4" in empty["skipped"]


def test_missing_java_is_a_clear_error(monkeypatch):
    from pix2cap.evaluation import meteor as meteor_module

    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: None)
    with pytest.raises(meteor_module.JavaNotFoundError, match="apt-get install default-jre-headless"):
        meteor_module.MeteorScorer()


def test_caption_metrics_without_java_are_skipped_with_the_reason(monkeypatch):
    from pix2cap.evaluation import meteor as meteor_module
    from pix2cap.evaluation.densecap_evaluation import caption_metrics

    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: None)
    out = caption_metrics([("a red circle", "a red circle on the grass")], total=2)
    assert out["num_pairs"] == 1
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"):
        assert name not in out and "apt-get install default-jre-headless" in out["skipped"][name]
