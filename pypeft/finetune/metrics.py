"""What a classifier's predictions say beyond accuracy: the majority-class
baseline, macro-F1, per-class recall and the confusion matrix."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class ClassScores:
    accuracy: float
    macro_f1: float
    recall: list[float]             # per class: correct / true examples of it (nan for a class absent from the test)
    confusion: list[list[int]]      # [true class][predicted class]
    baseline: float                 # accuracy of always predicting the training split's most frequent class
    baseline_class: int

    @property
    def beats_baseline(self) -> bool:
        return self.accuracy > self.baseline


def class_scores(true: list[int], predicted: list[int], n_classes: int, train_labels: list[int]) -> ClassScores:
    """Scores of `predicted` against `true` (class ids 0..n_classes-1). The
    baseline predicts the class most frequent in train_labels (ties: the
    lowest id), as a model that learnt nothing but the class balance would."""
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(true, predicted):
        confusion[t][p] += 1
    f1s, recall = [], []
    for c in range(n_classes):
        tp = confusion[c][c]
        actual = sum(confusion[c])
        guessed = sum(row[c] for row in confusion)
        recall.append(tp / actual if actual else float("nan"))
        if actual or guessed:  # a class neither present nor predicted has no F1 (sklearn leaves it out too)
            f1s.append(2 * tp / (actual + guessed))
    counts = Counter(train_labels)
    majority = min(counts, key=lambda c: (-counts[c], c)) if counts else 0
    n = len(true)
    return ClassScores(accuracy=sum(t == p for t, p in zip(true, predicted)) / n if n else float("nan"),
                       macro_f1=sum(f1s) / len(f1s) if f1s else float("nan"), recall=recall, confusion=confusion,
                       baseline=sum(t == majority for t in true) / n if n else float("nan"), baseline_class=majority)


def confusion_text(confusion: list[list[int]], names: list[str]) -> str:
    """The matrix as aligned text: a row per true class, a column per predicted one."""
    width = max([len(n) for n in names] + [len(str(v)) for row in confusion for v in row] + [4])
    head = " " * (width + 2) + " ".join(f"{n[:width]:>{width}}" for n in names)
    rows = [f"{n[:width]:>{width}}  " + " ".join(f"{v:>{width}}" for v in row) for n, row in zip(names, confusion)]
    return "\n".join(["true \\ predicted", head, *rows])
