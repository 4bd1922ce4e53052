"""Tabular data: a CSV file with a target column, and scikit-learn's bundled tables, as feature vectors (N, F).

    dataset: {name: csv, root: patients.csv, target: diagnosis}       # test split: 20 %, stratified, split_seed 0
    dataset: {name: csv, root: train.csv, test_root: test.csv, target: diagnosis}
    dataset: {name: breast_cancer}                                    # or wine, digits_vectors: offline

Every column but the target is a feature and must be numeric: bnnas does not guess an encoding for
text columns (one-hot, ordinal, hashing all change the answer), so a non-numeric cell is refused with its
column and line, as are missing values, inf and a column constant over the training split. The target's
values are the classes (sorted as text). The loader keeps features as stored (layout `F`); the loaded
dataset standardizes each feature with the training split's mean and std (`nas.data.datasets`), and an
export's model.json carries both and the column names, so `nas-predict` reads CSV rows by header.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas.errors import DataError
from nas.validation import did_you_mean

FEATURES = "F"  # the raw layout of a feature vector: standardized per feature, not per channel
MISSING = {"", "na", "nan", "null", "none", "?"}


def read_table(
    path: Path, target: str | None, key: str, columns: list[str] | None = None, target_optional: bool = False
) -> tuple[np.ndarray, list | None, list]:
    """(features float64 (N, F), target values as text, feature names) of a CSV file with a header row.

    `columns`, when given, are the feature names the file must have (a stated test split, rows to predict on);
    their order in the file may differ. With `target_optional` a file without the target column gives None for
    the target values. `key` is the config key naming the file, for errors ("" for a file given by name).
    """
    where = f"{key}: {path}" if key else str(path)
    rows = _rows(path, where)
    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header):
        repeated = next(name for name in header if header.count(name) > 1)
        raise DataError(f"{where}: column '{repeated}' appears twice in the header")
    if target not in header and not target_optional:
        raise DataError(
            f"dataset.target: {path} has no column '{target}' (columns: {', '.join(header)})"
            f"{did_you_mean(target, header, {name: name for name in header})}"  # Y -> y: case and separators aside
        )
    names = [name for name in header if name != target]
    if columns is not None and sorted(names) != sorted(columns):
        missing, extra = sorted(set(columns) - set(names)), sorted(set(names) - set(columns))
        said = "; ".join(part for part in (_listed("lacks", missing), _listed("has extra", extra)) if part)
        raise DataError(f"{where}: its columns differ from the training data's: it {said}")
    order = [header.index(name) for name in (columns or names)]
    if not body:
        raise DataError(f"{where} has a header but no rows")
    x = np.empty((len(body), len(order)), dtype=np.float64)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{where} line {line}: {len(row)} values, the header names {len(header)}")
        for j, column in enumerate(order):
            x[line - 2, j] = _number(row[column], where, line, header[column])
    if target not in header:
        return x, None, list(columns or names)
    y = [row[header.index(target)] for row in body]
    empty = next((line for line, value in enumerate(y, start=2) if value.lower() in MISSING), None)
    if empty is not None:
        raise DataError(f"{where} line {empty}: the target column '{target}' is missing a value")
    return x, y, list(columns or names)


def _rows(path: Path, where: str) -> list[list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            rows = [row for row in csv.reader(file) if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise DataError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{where} is not a readable CSV file: {exc}") from None
    if not rows:
        raise DataError(f"{where} is empty")
    return [[cell.strip() for cell in row] for row in rows]


def _number(cell: str, where: str, line: int, column: str) -> float:
    if cell.lower() in MISSING:
        raise DataError(
            f"{where} line {line}: column '{column}' is missing a value (bnnas does not impute: fill or drop "
            "the rows, or drop the column)"
        )
    try:
        value = float(cell)
    except ValueError:
        raise DataError(
            f"{where} line {line}: column '{column}' holds '{cell}', not a number (features must be numeric: "
            "encode it as numbers, or drop the column)"
        ) from None
    if not math.isfinite(value):
        raise DataError(f"{where} line {line}: column '{column}' holds {cell} (features must be finite)")
    return value


def _listed(verb: str, names: list[str]) -> str:
    return f"{verb} {', '.join(names)}" if names else ""


def refuse_constant(x_train: np.ndarray, names: list[str], where: str) -> None:
    """A feature with one value over the training split carries nothing and standardizes to 0 / 0: refused."""
    constant = [name for name, column in zip(names, x_train.T) if np.ptp(column) == 0]
    if constant:
        raise DataError(
            f"{where}: column{'s' if len(constant) > 1 else ''} {', '.join(constant)} "
            f"{'are' if len(constant) > 1 else 'is'} constant over the training split: drop "
            f"{'them' if len(constant) > 1 else 'it'}"
        )


def classes_of(y_train: list, y_test: list, where: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The classes (sorted as text) and both splits' labels as indices; one class only is refused."""
    classes = sorted(set(y_train) | set(y_test))
    if len(set(y_train)) < 2:
        raise DataError(f"{where}: the training split has one class only ({classes[0]}): nothing to classify")
    index = {name: i for i, name in enumerate(classes)}
    return classes, np.array([index[v] for v in y_train]), np.array([index[v] for v in y_test])


def split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, where: str):
    """A stratified train/test split of `fraction` test samples, drawn by `seed` (scikit-learn's)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    if counts[counts > 0].min() < 2:
        rare = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
        raise DataError(f"{where}: class {rare} has one sample: a stratified test split needs two of every class")
    try:
        return train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)
    except ValueError as exc:
        raise DataError(f"dataset.test_fraction: {exc}") from None


@dataclass
class Table:
    """A loaded table, both splits: features as read (float64), labels as class indices."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    description: str  # what one raw row is, for model.json
    columns: tuple[str, ...]
    target: str | None = None  # the CSV column the classes came from


def load_csv(cfg) -> Table:
    """`dataset: {name: csv, root: FILE, target: COLUMN}`, with `test_root` or a seeded stratified test split."""
    if not cfg.root:
        raise DataError("dataset.root: the csv dataset needs dataset.root set to a .csv file")
    if not cfg.target:
        raise DataError("dataset.target: the csv dataset needs dataset.target, the column that holds the classes")
    path = Path(cfg.root).expanduser()
    x, y, names = read_table(path, cfg.target, "dataset.root")
    if cfg.test_root:
        test = Path(cfg.test_root).expanduser()
        x_train, (x_test, y_test, _) = x, read_table(test, cfg.target, "dataset.test_root", names)
        classes, y_train, y_test = classes_of(y, y_test, "dataset.root")
    else:
        classes, labels, _ = classes_of(y, [], "dataset.root")
        x_train, x_test, y_train, y_test = split(x, labels, cfg.test_fraction, cfg.split_seed, "dataset.root")
    refuse_constant(x_train, names, "dataset.root")
    description = f"one row of {path.name}'s {len(names)} feature columns (all but '{cfg.target}'), as numbers"
    return Table(x_train, y_train, x_test, y_test, classes, description, tuple(names), cfg.target)


def sklearn_table(loader: str, what: str):
    """A loader for one of scikit-learn's bundled tables (offline), split as `dataset.test_fraction` and
    `dataset.split_seed` say (the defaults give `digits_vectors` the `digits` dataset's split)."""

    def load(cfg) -> Table:
        from sklearn import datasets as bundled

        bunch = getattr(bundled, loader)()
        x_train, x_test, y_train, y_test = split(bunch.data, bunch.target, cfg.test_fraction, cfg.split_seed, "dataset")
        names = tuple(str(name) for name in bunch.feature_names)
        classes = [str(c) for c in bunch.target_names]
        return Table(x_train, y_train, x_test, y_test, classes, f"scikit-learn's {loader}().data row: {what}", names)

    return load


TABLES = {
    "csv": load_csv,
    "breast_cancer": sklearn_table("load_breast_cancer", "30 measurements of a breast mass, 2 classes"),
    "wine": sklearn_table("load_wine", "13 chemical measurements of a wine, 3 cultivars"),
    "digits_vectors": sklearn_table("load_digits", "the 8x8 digit's 64 pixels (0..16) as one vector, 10 classes"),
}
