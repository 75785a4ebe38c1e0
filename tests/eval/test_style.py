"""Style metrics on hand-made inputs with exact expected values."""

from __future__ import annotations

import math

import pytest

from eval import style


def test_tokenize_words_and_cjk_characters():
    assert style.tokenize("Hello, World! It's 2 cats.") == ["hello", "world", "it", "s", "2", "cats"]
    assert style.tokenize("我爱北京 ok") == ["我", "爱", "北", "京", "ok"]
    assert style.is_cjk("我爱北京天安门") and not style.is_cjk("hello world 北")


def test_chrf_exact_values():
    assert style.chrf("abc", "abc") == 100.0
    assert style.chrf("", "abc") == 0.0
    # char 1..4-grams of abcd vs abce: P = R = 3/4, 2/3, 1/2, 0 -> mean 0.4791666 (5,6-grams absent)
    assert style.chrf("abcd", "abce") == pytest.approx(100 * (0.75 + 2 / 3 + 0.5 + 0) / 4)
    assert 0 < style.chrf("我爱北京天安门", "我爱北京") < 100


def test_rouge_l_word_and_character_level():
    # LCS 3 of 3 hypothesis words and 6 reference words: P=1, R=.5, F=2/3
    assert style.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert style.rouge_l("The cat SAT.", "the cat sat") == pytest.approx(1.0)
    # Chinese is scored per character (rouge-score's own tokenizer would drop it and give 0)
    assert style.rouge_l("我爱北京", "我爱上海") == pytest.approx(0.5)
    assert style.rouge_l("abc", "xyz") == 0.0


def test_distinct_n_and_length_ratio():
    texts = ["a b a", "b c"]  # unigrams a b a b c: 3 unique of 5; bigrams ab ba bc: 3 of 3
    assert style.distinct_n(texts, 1) == pytest.approx(3 / 5)
    assert style.distinct_n(texts, 2) == pytest.approx(1.0)
    assert style.distinct_n(["a"], 2) == 0.0
    assert style.length_ratio(["a b", "c d e f"], ["a b c"]) == pytest.approx(2.0)
    assert style.length_ratio(["一二三"], ["一二三四五六"]) == pytest.approx(0.5)


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    assert style.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    lo, hi = style.bootstrap_ci([0, 1, 0, 1, 1, 0, 1, 0], seed=3)
    assert lo < 0.5 < hi and (lo, hi) == style.bootstrap_ci([0, 1, 0, 1, 1, 0, 1, 0], seed=3)
    assert all(math.isnan(x) for x in style.bootstrap_ci([]))
    assert style.summarize([1.0, 3.0])["mean"] == 2.0


PIRATE = [f"Arr matey, the {w} be fine today, arr!" for w in ("sea", "ship", "gold", "rum", "wind", "map")]
PLAIN = [
    f"Sure. Here is some information about the {w}." for w in ("sea", "ship", "gold", "rum", "wind", "map")
]


def test_style_classifier_separates_and_scores_out_of_fold():
    fit = style.fit_style_classifier(PIRATE, PLAIN, seed=0)
    assert fit.cv_accuracy == 1.0 and fit.cv_folds == 5
    assert max(fit.base_oof_proba) < 0.5
    probs = style.classifier_proba(fit, ["Arr matey, the parrot be fine, arr!", "Sure. Here is information."])
    assert probs[0] > 0.5 > probs[1]


def test_score_targets_without_embeddings():
    out = style.score_targets(PIRATE, {"base": PLAIN, "pirate": PIRATE}, "base", embeddings=False)
    pirate, base = out["targets"]["pirate"], out["targets"]["base"]
    assert pirate["chrf"]["mean"] == 100.0 and pirate["rouge_l"]["mean"] == 1.0
    assert pirate["length_ratio"]["value"] == 1.0 and pirate["chrf"]["n"] == 6
    assert base["chrf"]["mean"] < 50 and base["style_proba"]["mean"] < 0.5 < pirate["style_proba"]["mean"]
    assert out["classifier"]["cv_accuracy"] == 1.0
    assert "embedding_sim" not in pirate
    assert out["reference"]["distinct_1"] == pytest.approx(pirate["distinct_1"]["value"])


def test_rouge_l_matches_rouge_score_on_english():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [
        ("the quick brown fox jumps", "a quick brown dog jumps over"),
        ("a b c d", "d c b a"),
        ("x", "y"),
    ]
    for hyp, ref in pairs:
        assert style.rouge_l(hyp, ref) == pytest.approx(scorer.score(ref, hyp)["rougeL"].fmeasure)
    assert style.lcs_length("abcbdab", "bdcaba") == 4
