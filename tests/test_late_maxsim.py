from __future__ import annotations

import pytest
import torch

from modalign.errors import ModalignError
from modalign.late import (
    Ragged,
    maxsim_pairs,
    maxsim_scores,
    maxsim_search,
    modality_wins,
    prefilter_search,
    topk_recall,
)


def sets(n, dim, gen, lo=1, hi=7, tags=None):
    out, tg = [], []
    for _ in range(n):
        m = int(torch.randint(lo, hi, (1,), generator=gen))
        out.append(torch.randn(m, dim, generator=gen, dtype=torch.float64))
        tg.append(torch.randint(0, tags or 1, (m,), generator=gen))
    return Ragged.from_list(out, tg if tags else None)


def naive(q: Ragged, d: Ragged):
    out = torch.zeros(len(q), len(d), dtype=torch.float64)
    for i in range(len(q)):
        for j in range(len(d)):
            total = 0.0
            for a in q.values[q.offsets[i]:q.offsets[i + 1]]:
                best = None
                for b in d.values[d.offsets[j]:d.offsets[j + 1]]:
                    v = float(a @ b)
                    best = v if best is None else max(best, v)
                total += best if best is not None else 0.0
            out[i, j] = total
    return out


def test_blocked_scores_match_naive_loop_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    q, d = sets(7, 5, gen), sets(13, 5, gen, lo=0)  # some empty documents
    ref = naive(q, d)
    for budget in (1, 50, 1 << 20):  # one pair per block .. everything at once
        torch.testing.assert_close(maxsim_scores(q, d, max_elements=budget), ref)
    qv = q.values.clone().requires_grad_(True)
    dv = d.values.clone().requires_grad_(True)
    s = maxsim_scores(Ragged(qv, q.offsets), Ragged(dv, d.offsets), max_elements=40)
    (s * torch.arange(s.numel(), dtype=s.dtype).reshape(s.shape)).sum().backward()
    qv2 = q.values.clone().requires_grad_(True)
    dv2 = d.values.clone().requires_grad_(True)
    s2 = maxsim_scores(Ragged(qv2, q.offsets), Ragged(dv2, d.offsets), max_elements=1 << 20)
    (s2 * torch.arange(s2.numel(), dtype=s2.dtype).reshape(s2.shape)).sum().backward()
    torch.testing.assert_close(qv.grad, qv2.grad)
    torch.testing.assert_close(dv.grad, dv2.grad)
    sq, sd = sets(2, 3, gen), sets(3, 3, gen)
    assert torch.autograd.gradcheck(
        lambda a, b: maxsim_scores(Ragged(a, sq.offsets), Ragged(b, sd.offsets), max_elements=9),
        (sq.values.clone().requires_grad_(), sd.values.clone().requires_grad_()))
    pairs = maxsim_pairs(q, d.select(range(7)))
    torch.testing.assert_close(pairs, ref[:, :7].diagonal())


def test_search_topk_prefilter_and_ablation():
    gen = torch.Generator().manual_seed(1)
    q, d = sets(9, 4, gen), sets(40, 4, gen, tags=2)
    ref = naive(q, d)
    s, i = maxsim_search(q, d, k=5, max_elements=64)
    top = ref.topk(5, dim=1)
    torch.testing.assert_close(s, top.values)
    assert torch.equal(i, top.indices)
    ps, pi = prefilter_search(q, d, k=5, candidates=40)
    torch.testing.assert_close(ps, s)  # every document a candidate: exact
    assert torch.equal(pi, i)
    assert topk_recall(i, pi) == 1.0
    _, pi = prefilter_search(q, d, k=5, candidates=8)
    assert 0.0 <= topk_recall(i, pi) < 1.0
    no1 = d.drop_tags([1])
    keep = [t for t in range(len(d.values)) if d.tags[t] == 0]
    assert torch.equal(no1.values, d.values[keep]) and int(no1.counts().sum()) == len(keep)
    qq, dd = q, d.select(range(9))
    wins = modality_wins(qq, dd, 2)
    for n in range(9):
        docv = dd.values[dd.offsets[n]:dd.offsets[n + 1]]
        arg = (qq.values[qq.offsets[n]:qq.offsets[n + 1]] @ docv.T).argmax(1)
        assert wins[n].tolist() == torch.bincount(dd.tags[dd.offsets[n]:dd.offsets[n + 1]][arg],
                                                  minlength=2).tolist()
    with pytest.raises(ModalignError, match="k=0"):
        maxsim_search(q, d, k=0)
    with pytest.raises(ModalignError, match="same token space"):
        maxsim_scores(q, sets(2, 3, gen))
    with pytest.raises(ModalignError, match="offsets"):
        Ragged(torch.zeros(3, 2), torch.tensor([0, 2]))
