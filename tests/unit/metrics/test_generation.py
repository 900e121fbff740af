"""Generation metrics on hand-made cases whose values are worked out by hand."""

import pytest

from moekit.metrics.generation import (
    closest_output_usage,
    corpus_bleu,
    distinct_n,
    generation_metrics,
    oracle_bleu,
    pairwise_bleu,
    pattern_usage,
    refs_covered,
)

A = "the cat sat on the mat today"
B = "a dog ran in the park at noon"
C = "some birds flew over green hills slowly"


def test_bleu_is_100_for_an_exact_match_and_0_without_shared_4grams():
    assert corpus_bleu([A], [[A]]) == pytest.approx(100.0)
    assert corpus_bleu([A], [[C]]) == pytest.approx(0.0)


def test_multi_reference_bleu_uses_any_reference_and_allows_ragged_lists():
    # Input 0 has two references (the second matches), input 1 one reference (matches).
    assert corpus_bleu([A, B], [[C, A], [B]]) == pytest.approx(100.0)


def test_oracle_picks_the_best_output_per_input():
    outputs = [[C, A], [B, C]]
    refs = [[A], [B]]
    assert oracle_bleu(outputs, refs) == pytest.approx(100.0)
    m = generation_metrics(outputs, refs)
    # Output 0 is right for one input and wrong for the other; so is output 1.
    assert m["oracle_bleu"] == pytest.approx(100.0)
    assert m["bleu"] < 80.0


def test_pairwise_bleu_is_100_for_identical_outputs_and_0_for_disjoint_ones():
    assert pairwise_bleu([[A, A, A], [B, B, B]]) == pytest.approx(100.0)
    d = "one two three four five six seven"  # shares no word with A or C
    assert pairwise_bleu([[A, C, d], [C, d, A]]) == pytest.approx(0.0)
    # Sharing a word lifts it above 0 (sacrebleu smooths zero higher-order counts).
    assert 0.0 < pairwise_bleu([[A, B], [B, A]]) < 10.0
    assert pairwise_bleu([[A], [B]]) == 100.0  # one output: no diversity


def test_distinct_n_hand_counts():
    # unigrams: a b a b c -> 3 distinct of 5; bigrams: ab ba ab bc -> 3 distinct of 4
    texts = ["a b a", "b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a b c"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a"], 2) == 0.0
    with pytest.raises(ValueError, match="n=0"):
        distinct_n(texts, 0)


def test_refs_covered_counts_distinct_closest_references():
    refs = [[A, B, C]]
    assert refs_covered([[A, B, C]], refs) == pytest.approx(1.0)
    assert refs_covered([[A, A, A]], refs) == pytest.approx(1 / 3)
    # An output close to B but not equal: covered by closest match, not by exact match.
    near_b = "a dog ran in the park at night"
    assert refs_covered([[A, near_b, A]], refs) == pytest.approx(2 / 3)
    assert refs_covered([[A, near_b, A]], refs, min_bleu=100.0) == pytest.approx(1 / 3)


def test_closest_output_usage_shares_ties():
    refs = [[A, B]]
    assert closest_output_usage([[A, B]], refs) == pytest.approx([0.5, 0.5])
    assert closest_output_usage([[A, A]], refs) == pytest.approx([0.5, 0.5])  # every reference tied
    assert closest_output_usage([[A, C]], [[A]]) == pytest.approx([1.0, 0.0])


def test_pattern_usage_shares_and_errors():
    assert pattern_usage([0, 0, 2, 1], 3) == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="index 3"):
        pattern_usage([3], 3)


def test_inputs_with_different_numbers_of_outputs_are_refused():
    with pytest.raises(ValueError, match="input 1 has 1 outputs"):
        generation_metrics([[A, B], [A]], [[A], [B]])
    with pytest.raises(ValueError, match="input 0 has no reference"):
        oracle_bleu([[A]], [[]])


def test_metrics_dict_has_the_contract_keys():
    m = generation_metrics([[A, B], [B, A]], [[A], [B]])
    for key in ("bleu", "oracle_bleu", "pairwise_bleu", "distinct_1", "distinct_2", "refs_covered", "pattern_usage"):
        assert key in m
    assert m["refs_covered"] == pytest.approx(1.0)
    # Each reference is matched exactly by output 0 of its input.
    assert m["pattern_usage"] == pytest.approx([1.0, 0.0])
    assert m["bleu_per_output"][0] == pytest.approx(100.0) and m["bleu_per_output"][1] < 10.0
