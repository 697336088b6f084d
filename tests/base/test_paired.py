"""Per-document scores and the paired bootstrap, checked by hand on small synthetic examples."""
import hashlib
import itertools

import numpy as np
import pytest

from mmrec.errors import UserError
from mmrec.paired import (GATE_METRIC, DocScores, config_gain, difference, doc_id, figure_interval, load, paired_gain,
                          save)


def scores(bits, n_bytes, ids=None, whole=True, split_documents=None, metric=GATE_METRIC) -> DocScores:
    ids = tuple(ids or [doc_id(f"document {i}") for i in range(len(bits))])
    return DocScores(metric, ids, np.array(n_bytes, dtype=np.int64), np.array(bits, dtype=float), whole,
                     split_documents or len(ids))


def test_a_document_id_is_the_start_of_the_sha256_of_its_text():
    text = "In the beginning God created the heaven and the earth. Ωμέγα"
    assert doc_id(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def test_the_mean_gain_is_a_ratio_of_sums_and_the_interval_that_of_the_exact_bootstrap():
    # five documents of unequal length; the candidate gains more on some than on others
    n_bytes = [100, 300, 50, 200, 150]
    ref_bits = [150.0, 420.0, 90.0, 260.0, 240.0]
    cand_bits = [140.0, 400.0, 91.0, 230.0, 236.0]
    ref, cand = scores(ref_bits, n_bytes), scores(cand_bits, n_bytes)
    g = paired_gain(ref, cand, confidence=0.9, samples=20_000, seed=0)
    # by hand: (sum of bit differences) / (sum of bytes), not the mean of each document's bits/byte gain
    assert g.mean == pytest.approx((10 + 20 - 1 + 30 + 4) / 800) and g.documents == 5
    assert g.mean == pytest.approx(ref.bpb - cand.bpb)
    per_doc = np.mean((np.array(ref_bits) - cand_bits) / n_bytes)
    assert abs(g.mean - per_doc) > 1e-3

    # the exact bootstrap distribution: all 5^5 equally likely resamples, enumerated
    diff, b = np.array(ref_bits) - cand_bits, np.array(n_bytes, dtype=float)
    exact = np.array([diff[list(i)].sum() / b[list(i)].sum() for i in itertools.product(range(5), repeat=5)])
    # the Monte Carlo percentiles fall within the exact distribution's quantiles 1 point either side
    assert np.quantile(exact, 0.04) <= g.low <= np.quantile(exact, 0.06)
    assert np.quantile(exact, 0.94) <= g.high <= np.quantile(exact, 0.96)
    assert g.low < g.mean < g.high and g.confidence == 0.9


def test_one_figures_interval_is_the_exact_bootstrap_of_its_bits_over_its_bytes():
    n_bytes, bits = [100, 300, 50, 200], [150.0, 420.0, 90.0, 260.0]
    low, high = figure_interval(scores(bits, n_bytes), 0.8, 20_000, seed=1)
    b, n = np.array(bits), np.array(n_bytes, dtype=float)
    exact = np.array([b[list(i)].sum() / n[list(i)].sum() for i in itertools.product(range(4), repeat=4)])
    assert np.quantile(exact, 0.09) <= low <= np.quantile(exact, 0.11)
    assert np.quantile(exact, 0.89) <= high <= np.quantile(exact, 0.91)


def test_equal_gains_on_every_document_give_an_interval_of_one_point():
    n_bytes = [120, 80, 400]
    ref = scores([b * 1.5 for b in n_bytes], n_bytes)
    cand = scores([b * 1.4 for b in n_bytes], n_bytes)
    g = paired_gain(ref, cand, 0.95, 1000, seed=3)
    assert g.mean == pytest.approx(0.1) and g.low == pytest.approx(0.1) and g.high == pytest.approx(0.1)
    assert g.clears(0.1 - 1e-9) and not g.clears(0.1 + 1e-9)
    same = paired_gain(ref, ref, 0.95, 1000, seed=3)
    assert same.mean == 0 and not same.clears(0.0)  # no gain never clears, not even a margin of 0


def test_the_bootstrap_is_seeded_and_bounded_in_memory_whatever_the_split(monkeypatch):
    import tracemalloc

    import mmrec.paired

    def pair(n: int) -> tuple[DocScores, DocScores]:
        rng = np.random.default_rng(0)
        n_bytes = rng.integers(50, 500, n)
        return (scores(n_bytes * 1.5 + rng.normal(0, 20, n), n_bytes),
                scores(n_bytes * 1.48 + rng.normal(0, 20, n), n_bytes))

    ref, cand = pair(300)
    one = paired_gain(ref, cand, 0.95, 2000, seed=7)
    assert one == paired_gain(ref, cand, 0.95, 2000, seed=7)
    assert one != paired_gain(ref, cand, 0.95, 2000, seed=8)

    monkeypatch.setattr(mmrec.paired, "CELLS", 1000)  # 3 resamples a block instead of all 2000 at once
    small_blocks = paired_gain(ref, cand, 0.95, 2000, seed=7)
    assert small_blocks.mean == one.mean and abs(small_blocks.low - one.low) < 0.004

    # 2000 resamples of 2000 documents: drawn at once, 4 M cells (32 MB of draws alone, 96 MB at the peak);
    # in blocks of CELLS = 20,000 cells (10 resamples), what one block holds (about 0.5 MB) and the documents
    monkeypatch.setattr(mmrec.paired, "CELLS", 20_000)
    ref, cand = pair(2000)
    tracemalloc.start()
    try:
        paired_gain(ref, cand, 0.95, 2000, seed=7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak / 1e6:.1f} MB at the peak"


def test_documents_pair_by_id_in_any_order_and_tokenizer_bytes_do_not_matter():
    ids = [doc_id(t) for t in ["a", "b", "c", "d"]]
    ref = scores([10.0, 20.0, 30.0, 40.0], [10, 20, 30, 40], ids)
    # the same text in another order, the first document a little shorter (another tokenizer's first token)
    cand = scores([36.0, 27.0, 18.0, 8.0], [40, 30, 20, 8], ids[::-1])
    assert difference(ref, cand, "v1") is None
    g = paired_gain(ref, cand, 0.95, 500, seed=0)
    assert g.mean == pytest.approx(100 / 100 - 89 / 98)


def test_what_keeps_two_figures_from_comparing_is_named():
    a = scores([1.0] * 4, [1] * 4, [doc_id(t) for t in "abcd"])
    assert "v1's figure is test_bpb, this one's test_bpb_context" == difference(
        scores([1.0] * 4, [1] * 4, a.ids, metric="test_bpb"), a, "v1")
    subset = scores([1.0] * 2, [1] * 2, a.ids[:2], whole=False, split_documents=4)
    assert difference(a, subset, "v1") == ("this figure is on a subset of the test split (2 of its 4 documents, "
                                           "evaluate.max_tokens)")
    assert difference(subset, a, "v1").startswith("v1's is on a subset of the test split (2 of its 4 documents")
    other = scores([1.0] * 4, [1] * 4, [doc_id(t) for t in "abxy"])
    assert difference(a, other, "v1") == "another test text: 2 of v1's 4 documents are among these 4"
    assert difference(subset, subset, "v1") is None  # exactly the same documents compare
    with pytest.raises(UserError, match="share no test document"):
        paired_gain(a, scores([1.0] * 4, [1] * 4, [doc_id(t) for t in "wxyz"]), 0.95, 100, 0)


def test_a_score_file_round_trips_and_a_damaged_one_is_one_line(tmp_path):
    s = scores([1.25, 2.5], [3, 4], whole=False, split_documents=9)
    save(s, tmp_path / "tiny.docs.json")
    back = load(tmp_path / "tiny.docs.json", "evaluate@tiny")
    assert back.ids == s.ids and back.bits.tolist() == [1.25, 2.5] and back.bytes.tolist() == [3, 4]
    assert not back.whole_split and back.split_documents == 9 and back.digest == s.digest
    (tmp_path / "bad.docs.json").write_text('{"metric": "x", "ids": ["a"], "bytes": [], "bits": []}')
    with pytest.raises(UserError, match="bad.docs.json: not a per-document score file"):
        load(tmp_path / "bad.docs.json", "evaluate@tiny")


def seeds_of(rng: np.random.Generator, n_bytes: np.ndarray, rate: float, seeds: int, seed_std: float,
             doc_noise: float) -> list[DocScores]:
    """Runs of one config: each seed moves its whole figure (seed_std), each document moves a little (doc_noise)."""
    return [scores(n_bytes * (rate + rng.normal(0, seed_std)) + rng.normal(0, doc_noise, len(n_bytes)), n_bytes)
            for _ in range(seeds)]


def test_a_configs_gain_counts_the_seeds_beside_the_documents():
    rng = np.random.default_rng(0)
    n_bytes = rng.integers(50, 500, 60)
    ref = seeds_of(rng, n_bytes, 1.50, 3, 0.01, 5.0)
    cand = seeds_of(rng, n_bytes, 1.48, 3, 0.01, 5.0)
    g = config_gain(ref, cand, 0.95, 2000, seed=1, default_std=0.5)
    assert g.mean == pytest.approx(np.mean([r.bpb for r in ref]) - np.mean([c.bpb for c in cand]))
    assert g.measured == (True, True) and g.documents == 60  # 3 seeds a side: the default std is not used
    assert g.seed_std == pytest.approx((np.std([r.bpb for r in ref], ddof=1), np.std([c.bpb for c in cand], ddof=1)))
    # the documents alone: the paired bootstrap of the difference of means, as narrow as the gate's on one pair
    one = paired_gain(ref[0], cand[0], 0.95, 2000, seed=1)
    assert g.docs_high - g.docs_low < 1.5 * (one.high - one.low)
    # with the seeds counted the interval is several times wider, around the same gain
    assert g.high - g.low > 3 * (g.docs_high - g.docs_low)
    assert g.low < g.mean < g.high and g.low < g.docs_low and g.high > g.docs_high


def test_with_one_seed_a_side_the_default_std_stands_in_and_without_spread_the_interval_is_welchs():
    n_bytes = np.array([120, 80, 400, 250])
    # every document at the run's own rate: resampling documents moves no figure, only the seeds count
    ref = [scores(n_bytes * r, n_bytes) for r in (1.50, 1.52)]
    cand = [scores(n_bytes * r, n_bytes) for r in (1.46, 1.47, 1.45)]
    g = config_gain(ref, cand, 0.95, 500, seed=0, default_std=0.3)
    assert g.docs_low == pytest.approx(g.mean) and g.docs_high == pytest.approx(g.mean)
    from scipy import stats

    va, vb = np.var([1.50, 1.52], ddof=1) / 2, np.var([1.46, 1.47, 1.45], ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    assert g.mean == pytest.approx(1.51 - 1.46)
    assert (g.low, g.high) == pytest.approx((g.mean - half, g.mean + half))
    # one seed on the reference's side: its std is the default given, named as such, counted as known
    g1 = config_gain(ref[:1], cand, 0.95, 500, seed=0, default_std=0.01)
    assert g1.measured == (False, True) and g1.seed_std[0] == 0.01
    v = 0.01 ** 2 + vb
    assert g1.high - g1.mean == pytest.approx(stats.t.ppf(0.975, v ** 2 / (vb ** 2 / 2)) * np.sqrt(v))
    # one seed on either side and a default of 0: the documents alone, read off a normal distribution
    g0 = config_gain(ref[:1], cand[:1], 0.95, 500, seed=0, default_std=0.0)
    assert g0.measured == (False, False) and g0.low == pytest.approx(g0.mean) == pytest.approx(0.04)


def test_configs_whose_runs_hold_other_test_documents_do_not_compare():
    a = scores([1.0] * 4, [1] * 4, [doc_id(t) for t in "abcd"])
    other = scores([1.0] * 4, [1] * 4, [doc_id(t) for t in "abxy"])
    with pytest.raises(UserError, match="do not compare: another test text: 2 of the reference's first run's 4"):
        config_gain([a, a], [a, other], 0.95, 100, 0, 0.01)
