"""The one lookup over concatenated tables equals one table per field exactly: the same initial
draw, the same forward and backward, the same MEDA re-initialisation, and the optimiser reset acts
on exactly the redrawn field's rows (Adam moments, Adagrad sums, AdamAR last-update steps)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from meda.ctr.adaptive_reg import LAST_UPDATE, STEP
from meda.ctr.embedding import EmbeddingInit, FeatureEmbedding
from meda.ctr.features import PAD_INDEX, FeatureMap, Field
from meda.ctr.optim import build_optimizer, reset_state

KINDS = ("categorical", "numeric", "sequence")


def feature_map() -> FeatureMap:
    return FeatureMap([
        Field("zeta", "categorical", vocab_size=41),
        Field("alpha", "categorical", vocab_size=7),
        Field("price", "numeric"),
        Field("mid", "categorical", vocab_size=23),
        Field("age", "numeric"),
        Field("tags", "sequence", vocab_size=19, max_len=5),
        Field("clicks", "sequence", vocab_size=11, max_len=5),
    ])


def batch(fm: FeatureMap, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    cat = torch.stack([torch.randint(0, f.vocab_size, (n,), generator=g) for f in fm.categorical], dim=1)
    seq = torch.stack([torch.randint(0, f.vocab_size, (n, 5), generator=g) for f in fm.sequence], dim=1)
    seq[0] = PAD_INDEX  # an all-padding history
    seq[1, :, 3:] = PAD_INDEX
    return {"categorical": cat, "numeric": torch.rand(n, 2, generator=g) * 3, "sequence": seq}


def reference_tables(fm: FeatureMap, dim: int, init: EmbeddingInit, seed: int) -> dict[str, torch.Tensor]:
    """One leaf tensor per field, drawn as the per-field layer drew them: kind by kind, names sorted."""
    gen = torch.Generator().manual_seed(seed)
    tables = {}
    for kind in KINDS:
        for f in sorted((f for f in fm.fields if f.kind == kind), key=lambda f: f.name):
            t = torch.empty((dim,) if kind == "numeric" else (f.vocab_size, dim))
            init.fill_(t, gen)
            tables[f.name] = t.requires_grad_()
    return tables


def reference_forward(fm: FeatureMap, tables: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-field layer: one lookup per categorical field, a vector per numeric one, masked mean per sequence."""
    parts = [F.embedding(b["categorical"][:, i], tables[f.name]) for i, f in enumerate(fm.categorical)]
    parts += [b["numeric"][:, i : i + 1] * tables[f.name] for i, f in enumerate(fm.numeric)]
    for i, f in enumerate(fm.sequence):
        ids = b["sequence"][:, i, :]
        mask = (ids != PAD_INDEX).unsqueeze(-1).float()
        parts.append((F.embedding(ids, tables[f.name]) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))
    return torch.stack(parts, dim=1)


@pytest.mark.parametrize("dim", [1, 4, 16])
def test_concatenated_lookup_equals_one_table_per_field(dim: int) -> None:
    fm, init = feature_map(), EmbeddingInit("normal", 0.1)
    emb = FeatureEmbedding(fm, dim, init, generator=torch.Generator().manual_seed(3))
    ref = reference_tables(fm, dim, init, seed=3)
    for f in fm.fields:  # the same initial draw
        assert torch.equal(emb.field_rows(f.name), ref[f.name].detach())
    assert emb.table.shape == (41 + 7 + 23 + 19 + 11, dim)
    b = batch(fm)
    out, expected = emb(b), reference_forward(fm, ref, b)
    assert out.shape == (64, 7, dim) and torch.equal(out, expected)  # the same forward
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for f in fm.fields:  # the same backward, field by field
        start, stop = emb.spans.get(f.name, (None, None))
        if f.kind == "numeric":  # the same sum over the batch, in another order (float rounding only)
            i = [g.name for g in fm.numeric].index(f.name)
            assert torch.allclose(emb.numeric.grad[i * dim : (i + 1) * dim], ref[f.name].grad, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(emb.table.grad[start:stop], ref[f.name].grad)


def test_reinitialise_redraws_exactly_the_named_fields_rows_with_the_per_field_draws() -> None:
    fm, init = feature_map(), EmbeddingInit("uniform", 0.05)
    torch.manual_seed(0)
    emb = FeatureEmbedding(fm, 4, init)
    before = {f.name: emb.field_rows(f.name).detach().clone() for f in fm.fields}
    rows = emb.reinitialise(["mid", "tags"], generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for name in ("mid", "tags"):  # drawn in the order given, as the per-field tables were
        t = torch.empty(emb.vocab_sizes[name], 4)
        init.fill_(t, gen)
        assert torch.equal(emb.field_rows(name), t)
    assert all(torch.equal(emb.field_rows(n), before[n]) for n in before if n not in ("mid", "tags"))
    assert [(r.start, r.stop) for r in rows] == [emb.spans["mid"], emb.spans["tags"]]
    assert all(r.param is emb.table for r in rows)


def _trained(optimizer: str) -> tuple[FeatureEmbedding, torch.optim.Optimizer]:
    fm = feature_map()
    emb = FeatureEmbedding(fm, 4, EmbeddingInit("normal", 0.1), generator=torch.Generator().manual_seed(1))
    params = [p for p in (emb.table, emb.numeric)]
    opt = build_optimizer(optimizer, params, [], lr=0.01, options={"ar_alpha": 0.1} if optimizer == "adamar" else {})
    for _ in range(3):
        opt.zero_grad()
        emb(batch(fm)).pow(2).sum().backward()
        opt.step()
    return emb, opt


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "adamar"])
def test_optimizer_reset_acts_on_exactly_the_redrawn_rows(optimizer: str) -> None:
    emb, opt = _trained(optimizer)
    state = opt.state[emb.table]
    before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    start, stop = emb.spans["mid"]
    reset_state(opt, emb.reinitialise(["mid"], generator=torch.Generator().manual_seed(2)))
    keep = torch.ones(emb.table.shape[0], dtype=torch.bool)
    keep[start:stop] = False
    for key, value in before.items():
        now = opt.state[emb.table][key]
        if value.dim() == 0:  # the step count carries on
            assert torch.equal(now, value)
            continue
        assert torch.equal(now[keep], value[keep]), key  # other fields' rows untouched
        if key == LAST_UPDATE:  # AdamAR: the redrawn rows' interval counts from now
            assert (now[start:stop] == opt.param_groups[0][STEP]).all()
        elif key == "sum":
            assert (now[start:stop] == opt.param_groups[0]["initial_accumulator_value"]).all()
        else:
            assert (now[start:stop] == 0).all() and value[start:stop].abs().sum() > 0, key
    assert opt.state[emb.numeric]  # numeric vectors are never reset


def test_optimizer_reset_of_every_field_forgets_the_whole_state_as_a_fresh_table() -> None:
    emb, opt = _trained("adam")
    reset_state(opt, emb.reinitialise(generator=torch.Generator().manual_seed(2)))
    assert emb.table not in opt.state  # Adam restarts its step count (bias correction) like a new parameter
    assert emb.numeric in opt.state
