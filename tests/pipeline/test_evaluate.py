import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmrec.pipeline.evaluate import unigram_nll
from mmrec.model.inference import (bits_per_byte, generate, perplexity, score, score_carried, score_context, sliding_windows,
                              text_bytes)
from mmrec.model.lm import ModelConfig, build_model
from mmrec.data.tokenizer import load_tokenizer, load_tokens, read_header


def small_model(arch: str = "mmrec"):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=50, width=16, layers=2, memories=2, ffn="swiglu", ffn_mult=2.0,
                      dpg_rank=4, chunk_size=8, min_floor=0.5, max_floor=0.99, uboo_weight=0.0, head_dim=8,
                      norm_eps=1e-6, dropout=0.0)
    return build_model(cfg).eval()


def test_bits_per_byte_by_hand():
    # 8 bits of surprise spread over 4 bytes is 2 bits per byte, whatever the token count
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert perplexity(math.log(7)) == pytest.approx(7.0)


def test_unigram_nll_by_hand():
    train = np.array([0, 0, 1], dtype=np.uint16)  # add-one counts [3, 2] -> p = [0.6, 0.4]
    test = np.array([1, 1, 0], dtype=np.uint16)  # targets are test[1:] = [1, 0]
    assert unigram_nll(np.bincount(train), test) == pytest.approx(-(math.log(0.4) + math.log(0.6)))


def test_score_weights_every_token_not_every_batch():
    model = small_model()
    tokens = np.random.default_rng(0).integers(0, 50, 200).astype(np.uint16)
    windows = [(0, 30), (30, 30), (60, 5)]  # one batch of two windows, one of a short window
    s = score(model, tokens, windows, batch_size=2, device=torch.device("cpu"))
    nll = []
    for start, n in windows:
        x = torch.from_numpy(tokens[start:start + n].astype(np.int64))[None]
        y = torch.from_numpy(tokens[start + 1:start + n + 1].astype(np.int64))
        nll.append(F.cross_entropy(model(x).logits[0], y, reduction="none"))
    every = torch.cat(nll)
    assert s.tokens == 65 and s.loss == pytest.approx(every.mean().item(), rel=1e-5)
    means = [t.mean().item() for t in [torch.cat(nll[:2]), nll[2]]]
    assert abs(s.loss - sum(means) / 2) > 1e-3  # a mean of batch means would be another number


def test_carried_state_over_two_windows_equals_one_window_over_both():
    model = small_model("mmrec")
    tokens = np.random.default_rng(1).integers(0, 50, 201).astype(np.uint16)
    whole = score(model, tokens, [(0, 200)], batch_size=1, device=torch.device("cpu"))
    carried = score_carried(model, tokens, 100, torch.device("cpu"))  # two windows, the state handed over
    assert carried.tokens == whole.tokens == 200 and carried.top1 == whole.top1
    assert carried.nll_sum == pytest.approx(whole.nll_sum, rel=1e-5)
    cold = score(model, tokens, [(0, 100), (100, 100)], batch_size=2, device=torch.device("cpu"))
    assert abs(cold.nll_sum - whole.nll_sum) > 1e-3  # without the state the second window is another number
    assert score_context(model, tokens, 50, 2, torch.device("cpu")).nll_sum == pytest.approx(whole.nll_sum, rel=1e-5)


@pytest.mark.parametrize("n, seq_len, stride", [(201, 32, 16), (1000, 256, 128), (40, 64, 32), (2, 8, 4),
                                                (130, 33, 16)])
def test_sliding_windows_score_every_target_once_with_half_a_window_of_context(n, seq_len, stride):
    scored = []
    for i, (start, length, skip) in enumerate(sliding_windows(n, seq_len, stride)):
        assert 0 <= start and start + length <= n - 1 and length <= seq_len  # inputs and targets inside the stream
        assert i == 0 or skip >= seq_len - stride  # a later window's first scored target has half a window behind it
        scored += range(start + skip, start + length)  # target p is tokens[p + 1]
    assert sorted(scored) == list(range(n - 1))


# 90 tokens, 89 targets (target p is tokens[p + 1]), seq_len 32 sliding by 16, written out by hand: the first
# window scores its 32 targets from token 0 on; each later one scores the next 16 (the last, the 9 left) and
# reads from 32 tokens before its end, so every target after the first window has 16 or more tokens behind it.
GPT_CONTEXT_FROM = [(range(0, 32), 0), (range(32, 48), 16), (range(48, 64), 32), (range(64, 80), 48),
                    (range(80, 89), 57)]


def test_gpt_sliding_score_is_the_nll_of_each_target_once_with_its_half_window_of_context():
    model = small_model("gpt").double()  # a random model's NLL moves little with the context: keep the noise lower
    tokens = torch.from_numpy(np.random.default_rng(2).integers(0, 50, 90).astype(np.int64))
    s = score_context(model, tokens.numpy().astype(np.uint16), 32, 4, torch.device("cpu"))
    expected, scored = 0.0, []
    for targets, start in GPT_CONTEXT_FROM:  # no window arithmetic shared with the code
        logits = model(tokens[None, start:targets.stop]).logits[0]  # causal: row p - start reads tokens[start:p + 1]
        for p in targets:
            expected += F.cross_entropy(logits[p - start], tokens[p + 1]).item()
            scored.append(p)
    assert scored == list(range(89)) and s.tokens == 89
    assert s.nll_sum == pytest.approx(expected, rel=1e-6)


def test_text_bytes_counts_the_utf8_bytes_the_tokens_encode(tokenized):
    sp = load_tokenizer(tokenized / "models/tokenizer")
    header = read_header(tokenized / "data/tokens")
    test = load_tokens(tokenized / "data/tokens", "test")
    assert text_bytes(sp, test, sp.eos_id()) == header["splits"]["test"]["bytes"]


@pytest.mark.parametrize("arch", ["mmrec", "gpt"])
def test_greedy_generation_with_carried_state_matches_rereading_the_context(arch):
    model = small_model(arch)
    prompt = [3, 14, 15, 9]
    out = generate(model, prompt, 12, greedy=True)
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_sampling_is_seeded_and_stops_at_eos():
    model = small_model()
    a = generate(model, [1, 2], 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    b = generate(model, [1, 2], 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a == b and len(a) == 20
    first = a[0]
    assert generate(model, [1, 2], 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3),
                    eos_id=first) == []


def test_a_documents_eos_is_its_own_and_the_streams_first_token_is_never_scored():
    from mmrec.model.inference import DocumentTally

    tokens = np.array([5, 6, 2, 7, 2, 8, 9], dtype=np.uint16)  # two documents ended by EOS (2), a third cut short
    tally = DocumentTally(tokens, eos_id=2)
    assert tally.spans() == [(0, 3), (3, 5), (5, 7)]
    tally.add(np.arange(1, 7), np.array([1.0, 10.0, 100.0, 1000.0, 1e4, 1e5]))  # targets 1..6: all but the first
    assert tally.nll.tolist() == [11.0, 1100.0, 110000.0]
    assert DocumentTally(tokens[:5], 2).spans() == [(0, 3), (3, 5)]  # a stream that ends in EOS has no third


@pytest.mark.parametrize("arch, max_tokens", [("mmrec", 0), ("gpt", 0), ("mmrec", 700)])
def test_per_document_scores_add_up_to_the_gates_figure_and_name_the_documents_by_their_text(tokenized, arch,
                                                                                              max_tokens):
    import hashlib

    from mmrec.pipeline.evaluate import test_metrics
    from tests.conftest import tiny_params

    params = tiny_params(tokenized, model={"arch": arch}, evaluate={"max_tokens": max_tokens})
    header = read_header(tokenized / "data/tokens")
    cfg = ModelConfig.from_params(params.model, params.rung("tiny"), header["vocab_size"])
    torch.manual_seed(0)
    metrics, docs, inputs = test_metrics(build_model(cfg), params, tokenized)
    assert docs.metric == "test_bpb_context" and docs.whole_split == (max_tokens == 0)
    n = metrics["test_tokens_scored"]  # windows read what they score; GPT's sliding pass reads each half twice
    assert inputs == 2 * n if arch == "mmrec" else 2.5 * n - 16 <= inputs <= 3 * n
    assert int(docs.bytes.sum()) == metrics["test_bytes_scored"] and len(docs.ids) == metrics["test_documents"]
    assert docs.bits.sum() / docs.bytes.sum() == pytest.approx(metrics["test_bpb_context"], rel=1e-12)
    # ids: the sha256 of each document's text as the download stage wrote (and hashed) it
    texts = (tokenized / "data/prepared/test.txt").read_text(encoding="utf-8").split("\n")[:-1]
    expected = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]
    assert docs.split_documents == len(texts) == header["splits"]["test"]["documents"]
    if max_tokens:
        assert list(docs.ids[:-1]) == expected[:len(docs.ids) - 1] and docs.ids[-1] not in expected  # the last is cut
    else:
        assert list(docs.ids) == expected
        assert docs.bytes[1:].tolist() == [len(t.encode()) for t in texts[1:]]  # whole documents after the first


def test_the_unigram_baseline_counts_the_train_split_a_block_at_a_time(workdir):
    """evaluate's memory is bounded by the model and the capped test split, never by the train split: the
    unigram baseline once made an int64 copy of every train id (1.30 GB for a 288 MB corpus)."""
    import tracemalloc

    from mmrec.pipeline.evaluate import test_metrics
    from tests.conftest import grow_train_split, tiny_params

    ids = np.fromfile(grow_train_split(workdir, 12_000_000), dtype=np.uint16)
    params = tiny_params(workdir)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_params(params.model, params.rung("tiny"), 400))
    tracemalloc.start()
    try:
        metrics, _, _ = test_metrics(model, params, workdir)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak_mb < 16, peak_mb  # the whole split as int64: 96 MB
    counts = np.bincount(ids, minlength=400)
    test = load_tokens(workdir / "data/tokens", "test")[:params.evaluate.max_tokens]
    assert metrics["unigram_loss"] * metrics["test_tokens_scored"] == pytest.approx(unigram_nll(counts, test),
                                                                                   rel=1e-12)
