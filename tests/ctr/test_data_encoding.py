"""Vocabularies (train only, min_count, OOV), hashing and numeric transforms."""

import numpy as np
import pyarrow as pa
import pytest

from meda.ctr.features import OOV_INDEX, PAD_INDEX
from meda.ctr.transforms import MISSING_BUCKET, LogBuckets, QuantileBuckets, Standardise, fit_numeric
from meda.ctr.vocab import HashedVocabulary, Vocabulary, stable_hash


def test_vocabulary_min_count_and_oov() -> None:
    train = pa.array(["a", "b", "a", "c", "a", "b", ""])
    vocab = Vocabulary.fit(train, min_count=2)
    assert vocab.tokens.to_pylist() == ["a", "b"]  # most frequent first
    assert vocab.size == 4  # pad + oov + 2
    ids = vocab.encode(pa.array(["b", "a", "c", "unseen", ""]))
    assert ids.tolist() == [3, 2, OOV_INDEX, OOV_INDEX, OOV_INDEX]
    assert ids.dtype == np.int64


def test_vocabulary_min_count_one_keeps_every_train_token() -> None:
    vocab = Vocabulary.fit(pa.array(["x", "y", "y", ""]), min_count=1)
    assert vocab.tokens.to_pylist() == ["y", "", "x"]  # ties broken by token
    assert PAD_INDEX not in vocab.encode(pa.array(["x", "y", ""])).tolist()


def test_vocabulary_rejects_bad_min_count() -> None:
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.fit(pa.array(["a"]), min_count=0)


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    return h


def test_stable_hash_is_fnv1a_of_utf8() -> None:
    words = ["", "a", "68fd1e64", "héllo", "a"]
    assert stable_hash(pa.array(words)).tolist() == [fnv1a(w.encode()) for w in words]


def test_hashed_vocabulary_range_and_consistency() -> None:
    hv = HashedVocabulary(7)
    tokens = pa.array([f"t{i}" for i in range(500)])
    ids = hv.encode(tokens)
    assert hv.size == 9
    assert ids.min() >= 2 and ids.max() <= 8
    assert len(np.unique(ids)) == 7  # 500 tokens fill every bucket
    assert (hv.encode(pa.chunked_array([tokens[:3]])) == ids[:3]).all()


def test_signed_log_and_raw() -> None:
    x = np.array([0.0, 1.0, -3.0, np.nan])
    np.testing.assert_allclose(fit_numeric("log", x).apply(x), [0.0, np.log(2), -np.log(4), 0.0], rtol=1e-6)
    assert fit_numeric("raw", x).apply(x).tolist() == [0.0, 1.0, -3.0, 0.0]


def test_standardise_uses_train_statistics() -> None:
    t = fit_numeric("standardise", np.array([1.0, 3.0, np.nan]))
    assert isinstance(t, Standardise) and (t.mean, t.std) == (2.0, 1.0)
    assert t.apply(np.array([5.0, np.nan])).tolist() == [3.0, 0.0]


def test_quantile_buckets_fitted_on_train() -> None:
    t = fit_numeric("bucket", np.arange(100.0), n_buckets=4)
    assert isinstance(t, QuantileBuckets) and t.categorical
    np.testing.assert_allclose(t.edges, [24.75, 49.5, 74.25])
    assert t.size == 3 + 4
    assert t.apply(np.array([-5.0, 30.0, 1e9, np.nan])).tolist() == [3, 4, 6, MISSING_BUCKET]


def test_log_buckets_criteo_winner_rule() -> None:
    assert LogBuckets.bucket_of(np.array([0.0, 2.0, 3.0, 100.0])).tolist() == [0, 2, 1, 21]
    t = fit_numeric("log-bucket", np.array([0.0, 2.0, 100.0, np.nan]))
    assert isinstance(t, LogBuckets) and t.values.tolist() == [0, 2, 21]
    # 1000 -> floor(log(1000)^2) = 47, unseen in train -> OOV
    assert t.apply(np.array([0.0, 100.0, 1000.0, np.nan])).tolist() == [3, 5, OOV_INDEX, MISSING_BUCKET]


def test_unknown_numeric_transform() -> None:
    with pytest.raises(ValueError, match="unknown numeric transform"):
        fit_numeric("sqrt", np.zeros(2))
