"""The demo's closing table says when its test split is too small to compare methods."""
from fbta.results import small_test_note


def test_small_test_split_points_to_the_protocol() -> None:
    note = small_test_note({"classification": {"vanilla": {"auc": 0.5, "n": 6}, "fbta": {"auc": 0.7, "n": 6}}})
    assert "6 test slides" in note and "0.33" in note and "benchmarks/fbta_protocol.py" in note


def test_large_or_missing_test_split_says_nothing() -> None:
    assert small_test_note({"classification": {"vanilla": {"auc": 0.5, "n": 90}}}) == ""
    assert small_test_note({"segmentation": {"teacher": {"f1": 0.6}}}) == ""
