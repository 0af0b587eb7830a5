"""The labelled movie-review snippets: parsing, labelling threshold and a split that never moves."""

from __future__ import annotations

import pytest

from quantization.datasets import LABEL_THRESHOLD, LABELS, movie_reviews, parse_snippets, split_of, write_examples
from quantization.errors import QuantizationError


def test_parsing_labels_by_sign_and_drops_near_neutral_scores():
    text = ("1\t2.26666666667\tThe Rock is destined to be great\r\n"
            "2\t-0.6\tEffective but too tepid biopic\r\n"
            "3\t0.4\tNeither here nor there\r\n"
            "4\t-0.5\tA little dull\r\n"
            "garbage line\r\n")
    ex = parse_snippets(text)
    assert [(e.id, LABELS[e.label], e.text) for e in ex] == [
        (1, "positive", "The Rock is destined to be great"), (2, "negative", "Effective but too tepid biopic"),
        (4, "negative", "A little dull")]


def test_the_packaged_split_is_disjoint_labelled_by_threshold_and_deterministic():
    splits = {s: movie_reviews(s) for s in ("train", "dev", "test")}
    ids = [{e.id for e in ex} for ex in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == 10072  # of 10,605 snippets, those with |score| >= 0.5
    assert 0.78 < len(splits["train"]) / 10072 < 0.82 and 0.08 < len(splits["test"]) / 10072 < 0.12
    for ex in splits.values():
        assert all(abs(e.score) >= LABEL_THRESHOLD and e.label == int(e.score > 0) for e in ex)
        assert all(split_of(e.id) == e.split for e in ex)
        assert 0.4 < sum(e.label for e in ex) / len(ex) < 0.6  # balanced, so accuracy means something


def test_writing_then_reading_gives_the_same_examples_and_the_same_bytes(tmp_path):
    ex = movie_reviews("dev")
    write_examples(ex, tmp_path / "a.tsv.gz")
    write_examples(ex, tmp_path / "b.tsv.gz")
    assert (tmp_path / "a.tsv.gz").read_bytes() == (tmp_path / "b.tsv.gz").read_bytes()
    assert [e for e in movie_reviews("dev", tmp_path / "a.tsv.gz")] == ex


def test_an_unknown_split_or_a_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(QuantizationError, match="choose one of: train, dev, test"):
        movie_reviews("validation")
    with pytest.raises(QuantizationError, match="python -m quantization data"):
        movie_reviews("train", tmp_path / "none.tsv.gz")
