"""Rule-based compositional text negatives: captions that share a caption's words but not its
meaning, so a model must read composition, not a bag of words (no language model needed).

Three rules, each applied where the caption allows it:

* ``swap``: exchange two content words (``"red car on a blue house"`` ->
  ``"blue car on a red house"``): the bag of words is kept;
* ``replace``: replace an attribute, number or relation word by another of its lexicon category
  (``"two red hearts"`` -> ``"three red hearts"``; colours, numbers, sizes, directions, positions,
  expressions), never by itself;
* ``negate``: negate the caption (``"smiling face"`` -> ``"no smiling face"``; an existing
  negation is removed instead).

Outputs equal to the source (case and spacing ignored) are rejected; the choice among the
candidates is seeded by the caption and ``seed`` (the same caption gives the same negatives in
every process).

Examples:
    >>> text_negatives("red heart", k=3)
    ['heart red', 'gray heart', 'no red heart']
    >>> text_negatives("grinning face", rules=("negate",))
    ['no grinning face']
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence

from modalign.errors import ModalignError

LEXICON: dict[str, tuple[str, ...]] = {
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white",
               "pink", "grey", "gray"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    "size": ("small", "large", "big", "little", "tiny", "huge", "tall", "short", "long"),
    "direction": ("left", "right", "up", "down", "north", "south", "east", "west"),
    "position": ("above", "below", "under", "over", "inside", "outside", "behind", "before",
                 "after", "on", "off", "in", "out"),
    "expression": ("smiling", "frowning", "grinning", "crying", "laughing", "winking", "sad",
                   "happy", "angry", "sleeping"),
    "temperature": ("hot", "cold", "warm", "cool"),
    "age": ("old", "young", "new"),
    "person": ("man", "woman", "boy", "girl", "person", "baby"),
}
STOPWORDS = frozenset({"a", "an", "the", "of", "with", "and", "or", "to", "at", "by", "for",
                       "is", "are", "its", "his", "her", "their", "-", "&", "no", "not",
                       "without", "button", "sign", "symbol"})
NEGATIONS = ("no", "not", "without")
RULES = ("swap", "replace", "negate")


def _category(word: str) -> str | None:
    lw = word.lower()
    return next((c for c, ws in LEXICON.items() if lw in ws), None)


def _match_case(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


def swap_candidates(caption: str) -> list[str]:
    """Every caption with two distinct content words exchanged."""
    words = caption.split()
    content = [i for i, w in enumerate(words)
               if w.lower() not in STOPWORDS and w.lower() not in LEXICON["position"]]
    out = []
    for a in range(len(content)):
        for b in range(a + 1, len(content)):
            i, j = content[a], content[b]
            if words[i].lower() == words[j].lower():
                continue
            w = list(words)
            w[i], w[j] = words[j], words[i]
            out.append(" ".join(w))
    return out


def replace_candidates(caption: str) -> list[str]:
    """Every caption with one lexicon word replaced by another of its category."""
    words = caption.split()
    out = []
    for i, word in enumerate(words):
        cat = _category(word)
        if cat is None:
            continue
        for other in LEXICON[cat]:
            if other != word.lower():
                w = list(words)
                w[i] = _match_case(other, word)
                out.append(" ".join(w))
    return out


def negate_candidates(caption: str) -> list[str]:
    """The caption negated (``"no ..."``), or with its negation word removed."""
    words = caption.split()
    neg = [i for i, w in enumerate(words) if w.lower() in NEGATIONS]
    if neg:
        return [" ".join(w for k, w in enumerate(words) if k != neg[0])]
    return [f"no {caption}"] if words else []


CANDIDATES: dict[str, Callable[[str], list[str]]] = {
    "swap": swap_candidates, "replace": replace_candidates, "negate": negate_candidates,
}


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def text_negatives(caption: str, k: int = 3, *, rules: Sequence[str] = RULES,
                   seed: int = 0) -> list[str]:
    """Up to ``k`` distinct hard negatives of ``caption``, taking the rules in turn.

    Args:
        caption: the true caption.
        k: how many negatives (fewer when the caption allows fewer).
        rules: which of ``"swap"``, ``"replace"``, ``"negate"`` to use, in this order.
        seed: seeds the choice among each rule's candidates (with the caption).
    """
    unknown = [r for r in rules if r not in CANDIDATES]
    if unknown:
        raise ModalignError(f"rules: unknown {unknown}; expected some of {list(RULES)}")
    if k < 1:
        raise ModalignError(f"k must be >= 1, got {k!r}")
    return [t for t, _ in labelled_negatives(caption, k, rules=rules, seed=seed)]


def labelled_negatives(caption: str, k: int = 3, *, rules: Sequence[str] = RULES,
                       seed: int = 0) -> list[tuple[str, str]]:
    """:func:`text_negatives` with the rule that made each negative."""
    rng = random.Random(zlib.crc32(caption.encode()) ^ (seed * 0x9E3779B1))
    pools = {}
    for r in rules:
        cands = [c for c in dict.fromkeys(CANDIDATES[r](caption)) if not _same(c, caption)]
        rng.shuffle(cands)
        pools[r] = cands
    out: list[tuple[str, str]] = []
    seen = {" ".join(caption.lower().split())}
    while len(out) < k and any(pools.values()):
        for r in rules:
            while pools[r]:
                c = pools[r].pop(0)
                key = " ".join(c.lower().split())
                if key not in seen:
                    seen.add(key)
                    out.append((c, r))
                    break
            if len(out) >= k:
                break
    return out
