"""The fused statistics kernels (meda.kv.kernels) against the plain PyTorch reference.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) when Triton is installed (it
is not in the CI venv: those tests skip); on CUDA the compiled kernels run under ``-m gpu``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from meda.kv import entropy, kernels, scoring

# (batch, kv_heads, group, keys, queries, head_dim): a full prefill, a chunk of the last queries, an odd head_dim
SHAPES = [(2, 2, 3, 70, 70, 16), (1, 1, 2, 83, 40, 24)]


def _inputs(shape, device="cpu", dtype=torch.float32, seed=0):
    b, hkv, g, n, nq, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, nq, d, generator=gen).to(device, dtype) * 2
    k = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype)
    valid = torch.ones(b, n, dtype=torch.bool)
    if b > 1:
        valid[1, :9] = False  # left padding
    vision = torch.zeros(b, n, dtype=torch.bool)
    vision[:, n // 4 : n // 2] = True
    return q, k, valid.to(device), (vision & valid).to(device)


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _reference(fn, *args, **kwargs):
    """The PyTorch path of a public function (the fused dispatch switched off)."""
    with _env(kernels.ENV_SWITCH, "0"):
        return fn(*args, **kwargs)


def _subsets(nq, device):
    rows = torch.tensor([nq - 1, 0, 5, 5, nq // 2], device=device)  # unsorted, with a duplicate
    per_row = torch.stack([rows, torch.arange(5, device=device) * 3])
    return [None, rows, per_row]


def check_against_reference(device: str, dtype: torch.dtype, atol: float, rtol: float) -> None:
    """Fused vs reference over shapes, query subsets, softcap and averaging; rows without an
    other-group key; and the public functions' dispatch to the kernel."""
    from meda.kv.kernels import statistics

    for shape in SHAPES:
        q, k, valid, vision = _inputs(shape, device, dtype)
        for subset in _subsets(q.shape[2], device):
            subset = subset if subset is None or subset.dim() == 1 or q.shape[0] == 2 else subset[:1]
            for softcap in (None, 3.0):
                for average in (False, True):
                    kw = dict(scaling=0.3, softcap=softcap, query_subset=subset, average_over_queries=average)
                    ref = _reference(scoring.cumulative_attention_scores, q, k, valid, **kw)
                    got = statistics.cumulative_scores(q, k, valid, **kw)
                    assert torch.equal(got.isinf(), ref.isinf())
                    torch.testing.assert_close(got.nan_to_num(neginf=0), ref.nan_to_num(neginf=0), atol=atol, rtol=rtol)
                kw = dict(scaling=0.3, softcap=softcap, query_subset=subset)
                ref = _reference(entropy.cross_modal_entropy_sums, q, k, vision, valid, **kw)
                got = statistics.entropy_sums(q, k, vision, valid, **kw)
                torch.testing.assert_close(got[1], ref[1])  # eligible row counts: exact
                torch.testing.assert_close(got[0], ref[0], atol=atol * 10, rtol=rtol)

    # text rows before 60 see no vision key: not eligible; padded rows neither
    q, k, valid, _ = _inputs(SHAPES[0], device, dtype)
    late = torch.zeros_like(valid)
    late[:, 60:] = True
    got = statistics.entropy_sums(q, k, late & valid, valid, scaling=0.3)
    ref = _reference(entropy.cross_modal_entropy_sums, q, k, late & valid, valid, scaling=0.3)
    assert got[1].tolist() == ref[1].tolist() == [[0.0, 10.0], [0.0, 10.0]]
    torch.testing.assert_close(got[0], ref[0], atol=atol * 10, rtol=rtol)

    # the public functions take the kernel where it is available, the reference with MEDA_FUSED_STATS=0
    assert kernels.fused_available(q)
    calls = []
    real = statistics.cumulative_scores
    statistics.cumulative_scores = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        scoring.cumulative_attention_scores(q, k, valid, scaling=0.25)
        _reference(scoring.cumulative_attention_scores, q, k, valid, scaling=0.25)
    finally:
        statistics.cumulative_scores = real
    assert calls == [1]


def test_fused_matches_reference_in_interpreter():
    """Runs this file in a child process under TRITON_INTERPRET=1 (Triton reads it when first imported)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", kernels.ENV_SWITCH: "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "interpreter checks passed" in done.stdout


def test_fused_unavailable_on_cpu_without_interpreter():
    with _env("TRITON_INTERPRET", "0"):
        assert not kernels.fused_available(torch.zeros(1))
    with _env(kernels.ENV_SWITCH, "0"), _env("TRITON_INTERPRET", "1"):
        assert not kernels.fused_available(torch.zeros(1))


@pytest.mark.gpu
def test_fused_matches_reference_on_gpu():
    pytest.importorskip("triton")
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    check_against_reference("cuda", torch.float32, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_fused_bf16_long_prompt_on_gpu():
    """bf16 inputs at a real head shape (7 query heads per KV head, dim 128): same statistics as the
    float32 reference to bf16-product accuracy."""
    pytest.importorskip("triton")
    from meda.kv.kernels import statistics

    q, k, valid, vision = _inputs((1, 2, 7, 3000, 3000, 128), "cuda", torch.bfloat16, seed=1)
    subset = torch.linspace(0, 2999, 257, device="cuda").round().long()
    for rows in (None, subset):
        kw = dict(scaling=128**-0.5, query_subset=rows)
        ref = _reference(scoring.cumulative_attention_scores, q, k, valid, **kw)
        got = statistics.cumulative_scores(q, k, valid, **kw)
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
        ref_e = _reference(entropy.cross_modal_entropy, q, k, vision, valid, **kw)
        got_e = entropy.cross_modal_entropy(q, k, vision, valid, **kw)
        torch.testing.assert_close(got_e, ref_e, atol=1e-3, rtol=1e-4)


if __name__ == "__main__":  # the interpreter child of test_fused_matches_reference_in_interpreter
    check_against_reference("cpu", torch.float32, atol=1e-5, rtol=1e-4)
    print("interpreter checks passed")
