"""Warnings where a number means little: inputs shared by splits, a small test split, a batch
too large for the training groups.

A paired dataset split by group can still leak: the same image file, or the same caption, may sit
in a training group and in a test group, and then test retrieval partly measures memory.
:func:`split_warnings` lists such overlaps with counts, and says when the test split is too small
for its metrics to mean much.

Examples:
    >>> from modalign.data.dataset import Item, PairedDataset
    >>> items = [Item("a", "text", "", "a cat", "g1", "train"),
    ...          Item("b", "text", "", "a cat", "g2", "test")]
    >>> print(split_warnings(PairedDataset("d", items), min_test_groups=0)[0][:60])
    leakage: 1 text value(s) appear in more than one split (2 ro
"""

from __future__ import annotations

from collections import defaultdict

from modalign.data.dataset import PairedDataset

MIN_TEST_GROUPS = 30


def split_warnings(ds: PairedDataset, min_test_groups: int = MIN_TEST_GROUPS) -> list[str]:
    """One line per problem: inputs shared across splits (per modality), and a small test split."""
    out = []
    for modality in ds.modalities:
        splits: dict[str, set[str]] = defaultdict(set)
        rows: dict[str, int] = defaultdict(int)
        for it in ds.select(modality=modality):
            key = it.value if modality == "text" else str(ds.resolve(it).resolve())
            splits[key].add(it.split)
            rows[key] += 1
        shared = [k for k, s in splits.items() if len(s) > 1]
        if shared:
            example = shared[0]
            shown = example if modality == "text" else example.rsplit("/", 1)[-1]
            out.append(f"leakage: {len(shared)} {modality} value(s) appear in more than one "
                       f"split ({sum(rows[k] for k in shared)} rows), e.g. {shown!r} in "
                       f"{sorted(splits[example])}")
    test_groups = len(ds.groups("test"))
    if test_groups < min_test_groups:
        out.append(f"small test split: {test_groups} test groups; metrics over fewer than "
                   f"{min_test_groups} queries move a lot from one draw to the next (eval "
                   "prints 95% intervals); add a 'split' column or evaluate with --split all")
    return out


def batch_warning(groups: int, batch_size: int) -> str | None:
    """A line when a batch holds more than a tenth of the training groups, else ``None``.

    Examples:
        >>> print(batch_warning(225, 64)[:78])
        batch 64 holds more than a tenth of the 225 training groups: 3 steps per epoch
        >>> batch_warning(10000, 256) is None
        True
    """
    if groups <= 0 or batch_size * 10 <= groups:
        return None
    steps = groups // batch_size
    return (f"batch {batch_size} holds more than a tenth of the {groups} training groups: "
            f"{steps} steps per epoch, {groups - steps * batch_size} groups dropped per epoch "
            "(the last partial batch); a smaller train.batch_size gives more steps")
