"""The seq2seq backbone and its decoding searches: masks, caches, padding, search results."""

import itertools
import math

import pytest
import torch

from moekit.models.seq2seq import Seq2Seq, Seq2SeqConfig, beam_search, greedy_decode, sample_decode, sequence_nll

PAD, BOS, EOS = 0, 2, 3


def _model(seed=0, vocab=13, dropout=0.0, **kw):
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(vocab, dim=16, heads=2, encoder_layers=2, decoder_layers=2, ffn_dim=32, dropout=dropout, **kw)
    return Seq2Seq(cfg).eval()


def _sources():
    # Three sources of different lengths, right-padded into one batch.
    seqs = [[5, 6, 7, 8, 9, EOS], [4, 11, EOS], [12, 5, 5, 7, EOS]]
    src = torch.zeros(3, 6, dtype=torch.long)
    for i, s in enumerate(seqs):
        src[i, : len(s)] = torch.tensor(s)
    return seqs, src


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="heads=3"):
        Seq2SeqConfig(10, dim=16, heads=3)
    with pytest.raises(ValueError, match="vocab_size=0"):
        Seq2SeqConfig(0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        Seq2SeqConfig(10, dropout=1.5)


def test_out_of_vocabulary_id_is_named():
    m = _model()
    with pytest.raises(ValueError, match="id 99"):
        m.encode(torch.tensor([[1, 99]]))
    with pytest.raises(TypeError, match="long"):
        m.encode(torch.tensor([[1.0, 2.0]]))


def test_padding_does_not_change_encoder_or_decoder_states():
    m = _model()
    seqs, src = _sources()
    tgt = torch.tensor([[BOS, 5, 6, 7], [BOS, 8, 0, 0], [BOS, 9, 9, 0]])
    mem = m.encode(src)
    h = m.decode(tgt, mem, src != PAD)
    for i, s in enumerate(seqs):
        alone = torch.tensor([s])
        mem_i = m.encode(alone)
        torch.testing.assert_close(mem[i, : len(s)], mem_i[0], rtol=1e-5, atol=1e-5)
        t_len = int((tgt[i] != PAD).sum())
        h_i = m.decode(tgt[i : i + 1, :t_len], mem_i, alone != PAD)
        torch.testing.assert_close(h[i, :t_len], h_i[0], rtol=1e-5, atol=1e-5)


def test_decoder_is_causal():
    m = _model()
    _, src = _sources()
    mem = m.encode(src)
    a = torch.tensor([[BOS, 5, 6, 7]] * 3)
    b = a.clone()
    b[:, 3] = 9  # changing the last token must not change earlier positions
    ha, hb = m.decode(a, mem, src != PAD), m.decode(b, mem, src != PAD)
    torch.testing.assert_close(ha[:, :3], hb[:, :3])
    assert not torch.allclose(ha[:, 3], hb[:, 3])


def test_cached_step_equals_full_recompute():
    m = _model(seed=1)
    _, src = _sources()
    mem = m.encode(src)
    mask = src != PAD
    start = torch.full((3,), BOS)
    full = m.step_fn(mem, mask, cache=False)
    cached = m.step_fn(mem, mask, cache=True)
    assert greedy_decode(full, start, 7, EOS, PAD) == greedy_decode(cached, start, 7, EOS, PAD)
    bf = beam_search(full, start, 6, EOS, beam_size=3, n_best=3)
    bc = beam_search(m.step_fn(mem, mask), start, 6, EOS, beam_size=3, n_best=3)
    assert [[h[0] for h in hs] for hs in bf] == [[h[0] for h in hs] for hs in bc]
    for hs_f, hs_c in zip(bf, bc, strict=True):
        assert [h[1] for h in hs_f] == pytest.approx([h[1] for h in hs_c], abs=1e-4)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_decoding_a_padded_batch_matches_decoding_each_source_alone(search):
    m = _model(seed=2)
    seqs, src = _sources()

    def run(s):
        mask = s != PAD
        step = m.step_fn(m.encode(s, mask), mask)
        start = torch.full((s.shape[0],), BOS)
        if search == "greedy":
            return greedy_decode(step, start, 8, EOS, PAD)
        return [[h[0] for h in hs] for hs in beam_search(step, start, 8, EOS, beam_size=3, n_best=2)]

    batch = run(src)
    alone = [run(torch.tensor([s]))[0] for s in seqs]
    assert batch == alone


@torch.no_grad()
def _brute_force_best(step_fn, max_len, vocab, length_penalty=1.0):
    # Score every sequence of up to max_len tokens (ending in EOS, or cut at max_len) exactly.
    best = None
    for n in range(0, max_len + 1):
        for body in itertools.product([t for t in range(vocab) if t != EOS], repeat=n):
            prefix = [BOS, *body]
            logp = 0.0
            for j in range(1, len(prefix) + 1):
                lp = step_fn(torch.tensor([prefix[:j]]), torch.tensor([0]), None)[0]
                nxt = prefix[j] if j < len(prefix) else EOS
                if j == len(prefix) and n == max_len:
                    break  # cut at max_len: no EOS is scored
                logp += float(lp[nxt])
            length = n + 1 if n < max_len else n
            score = logp / max(length, 1) ** length_penalty
            if best is None or score > best[1]:
                best = (list(body), score)
    return best


def test_wide_beam_finds_the_exact_best_sequence_on_a_tiny_vocabulary():
    m = _model(seed=3, vocab=4)  # tokens 0..3, pad=0 is a legal output here
    src = torch.tensor([[1, 2, EOS]])
    step = m.step_fn(m.encode(src), src != PAD, cache=False)
    seq, score = _brute_force_best(step, 3, 4)
    hyps = beam_search(m.step_fn(m.encode(src), src != PAD), torch.tensor([BOS]), 3, EOS, beam_size=64, n_best=1)
    assert hyps[0][0][0] == seq
    assert hyps[0][0][1] == pytest.approx(score, abs=1e-4)


def test_beam_returns_distinct_hypotheses_sorted_by_score():
    m = _model(seed=4)
    _, src = _sources()
    hyps = beam_search(m.step_fn(m.encode(src), src != PAD), torch.full((3,), BOS), 6, EOS, beam_size=4, n_best=4)
    for hs in hyps:
        assert len(hs) == 4
        assert len({tuple(h[0]) for h in hs}) == 4
        scores = [h[1] for h in hs]
        assert scores == sorted(scores, reverse=True)


def test_sampling_is_reproducible_and_follows_the_model():
    m = _model(seed=5, vocab=6)
    src = torch.tensor([[1, 2, EOS]])
    step = m.step_fn(m.encode(src), src != PAD)
    draw = lambda seed: sample_decode(step, torch.tensor([BOS]), 1, EOS, PAD, 4000,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))[0]
    a, b = draw(0), draw(0)
    assert a == b
    # One-token samples: their frequencies match the model's first-step distribution.
    probs = step(torch.tensor([[BOS]]), torch.tensor([0]), None)[0].exp()
    counts = torch.zeros(6)
    for s in a:
        counts[s[0] if s else EOS] += 1
    freq = counts / counts.sum()
    # 4000 draws: each frequency is within ~4 standard errors of its probability.
    tol = 4 * torch.sqrt(probs * (1 - probs) / 4000) + 1e-3
    assert bool(((freq - probs).abs() <= tol).all()), (freq, probs)


def test_sequence_nll_ignores_padding():
    logits = torch.randn(2, 4, 7)
    tgt = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]])
    nll = sequence_nll(logits, tgt, pad_id=0)
    lp = logits.log_softmax(-1)
    expect0 = -(lp[0, 0, 1] + lp[0, 1, 2] + lp[0, 2, 3])
    torch.testing.assert_close(nll, torch.stack([expect0, -lp[1, 0, 4]]))
    assert math.isfinite(float(nll.sum()))


def test_dropout_is_active_only_in_training():
    m = _model(dropout=0.5)
    _, src = _sources()
    tgt = torch.tensor([[BOS, 5, 6]] * 3)
    m.eval()
    assert torch.equal(m(src, tgt), m(src, tgt))
    m.train()
    assert not torch.equal(m(src, tgt), m(src, tgt))


def test_untied_projection_and_dtype():
    m = _model(tie_embeddings=False)
    assert m.out_proj is not None
    cfg = Seq2SeqConfig(9, dim=8, heads=2, encoder_layers=1, decoder_layers=1)
    m64 = Seq2Seq(cfg, dtype=torch.float64)
    assert m64.embed.weight.dtype == torch.float64
    out = m64(torch.tensor([[4, 3]]), torch.tensor([[BOS, 5]]))
    assert out.shape == (1, 2, 9) and out.dtype == torch.float64


# BART's text infilling, the noise of denoising pre-training.
def _kept_in_order(noised, ids, mask):
    it = iter(ids)
    return all(any(t == x for x in it) for t in noised if t != mask)


@pytest.mark.parametrize("seed", range(20))
def test_text_infilling_masks_spans_of_the_budget_and_keeps_the_rest_in_order(seed):
    import random

    from moekit.models.seq2seq import text_infilling

    ids = list(range(10, 30))  # 20 distinct tokens; mask id 0
    noised = text_infilling(ids, 0, random.Random(seed), ratio=0.3, mean_span=3.0)
    kept = [t for t in noised if t != 0]
    assert _kept_in_order(noised, ids, 0) and len(set(kept)) == len(kept)
    # 20 tokens * 0.3 = 6 removed (a span that finds no room can only make it fewer), each span
    # one mask: at least one mask, and never more masks than spans could be.
    assert 14 <= len(kept) <= 20 and 20 - len(kept) <= 6
    assert noised.count(0) >= 1
    # Every removed run of tokens sits where a mask is.
    i = 0
    for t in noised:
        if t == 0:
            continue
        gap = ids.index(t) - i
        if gap:
            assert 0 in noised[: noised.index(t)], (noised, t)
        i = ids.index(t) + 1


def test_text_infilling_by_hand_and_its_edges():
    import random

    from moekit.models.seq2seq import text_infilling

    assert text_infilling([5, 6, 7], 0, random.Random(0), ratio=0.0) == [5, 6, 7]
    # ratio 1 on two tokens: spans covering both, each span one mask, nothing kept.
    out = text_infilling([5, 6], 0, random.Random(1), ratio=1.0)
    assert set(out) <= {0} and 1 <= len(out) <= 3
    assert text_infilling([], 0, random.Random(0)) == []
    a = text_infilling(list(range(1, 40)), 0, random.Random(7))
    assert a == text_infilling(list(range(1, 40)), 0, random.Random(7))  # deterministic given the rng
    with pytest.raises(ValueError, match="ratio=1.5"):
        text_infilling([1, 2], 0, random.Random(0), ratio=1.5)


def test_poisson_draws_have_the_right_mean():
    import random

    from moekit.models.seq2seq import _poisson

    rng = random.Random(0)
    draws = [_poisson(rng, 3.0) for _ in range(4000)]
    # Mean 3 and variance 3: the sample mean of 4000 draws is within 4 standard errors (0.11).
    assert abs(sum(draws) / len(draws) - 3.0) < 0.11
    assert min(draws) == 0
