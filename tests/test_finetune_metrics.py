"""pypeft.finetune.metrics against plain definitions counted by hand in the
test (sklearn is not a dependency): confusion matrix, recall, macro-F1, the
majority-class baseline; and the classifier report's warning."""

import math
import random

import pytest

from pypeft.finetune.metrics import class_scores, confusion_text


def _reference(true, pred, n):
    f1 = []
    for c in range(n):
        tp = sum(t == c and p == c for t, p in zip(true, pred))
        fp = sum(t != c and p == c for t, p in zip(true, pred))
        fn = sum(t == c and p != c for t, p in zip(true, pred))
        if tp + fp + fn:
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(f1) / len(f1)


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_their_definitions(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    true = [rng.randrange(n) for _ in range(60)]
    pred = [t if rng.random() < 0.6 else rng.randrange(n) for t in true]
    train = [rng.randrange(n) for _ in range(80)]
    s = class_scores(true, pred, n, train)
    assert s.accuracy == sum(t == p for t, p in zip(true, pred)) / len(true)
    assert math.isclose(s.macro_f1, _reference(true, pred, n), rel_tol=1e-12)
    for c in range(n):
        assert s.confusion[c] == [sum(t == c and p == q for t, p in zip(true, pred)) for q in range(n)]
        members = [p for t, p in zip(true, pred) if t == c]
        assert s.recall[c] == (sum(p == c for p in members) / len(members) if members else s.recall[c])
    counts = [train.count(c) for c in range(n)]
    majority = counts.index(max(counts))
    assert s.baseline_class == majority and s.baseline == true.count(majority) / len(true)


def test_a_model_that_predicts_the_majority_class_does_not_beat_the_baseline():
    true = [0] * 64 + [1] * 20 + [2] * 16
    s = class_scores(true, [0] * 100, 3, [0] * 6 + [1] * 2 + [2] * 2)
    assert s.accuracy == s.baseline == 0.64 and not s.beats_baseline
    assert s.recall == [1.0, 0.0, 0.0] and math.isclose(s.macro_f1, (2 * 64 / (64 + 100)) / 3)


def test_confusion_text_has_a_row_per_true_class():
    text = confusion_text([[3, 1], [0, 4]], ["sport", "tech"])
    lines = text.splitlines()
    assert lines[0] == "true \\ predicted" and lines[1].split() == ["sport", "tech"]
    assert lines[2].split() == ["sport", "3", "1"] and lines[3].split() == ["tech", "0", "4"]


@pytest.mark.parametrize("learnt", [False, True])
def test_the_report_warns_when_the_baseline_is_not_beaten(learnt):
    import io

    from pypeft.finetune.train import _print_class_report

    true = [0] * 64 + [1] * 36
    pred = true if learnt else [0] * 100
    scores = class_scores(true, pred, 2, true)
    out = io.StringIO()
    _print_class_report(out, scores, scores, true, ["neutral", "positive"])
    text = out.getvalue()
    assert f"test accuracy after: {1.0 if learnt else 0.64:.4f}" in text
    assert "majority-class baseline 0.6400 (always 'neutral'" in text
    assert ("does not beat the majority-class baseline" in text) is (not learnt)
    assert "per-class recall after: neutral 1.00, positive " + ("1.00" if learnt else "0.00") in text
