"""The clinical table of a node: UCI Heart Disease parsing, FLamby's row filter, design matrix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client.data.tabular import (
    COVARIATES,
    design_matrix,
    load_tabular,
    parse_columns,
    row_norm_bound,
)
from common.errors import ConfigError, DataError

# Rows kept per site after dropping slope/ca/thal and then rows with a '?' (data README), and
# the count of num == 0 among them.
KEPT = {"cleveland": (303, 164), "hungarian": (261, 163), "switzerland": (46, 1), "va": (130, 29)}


@pytest.mark.parametrize("site", sorted(KEPT))
def test_real_sites_keep_flamby_rows_and_binary_target(
    site: str, shared_file: Callable[[str], Path]
) -> None:
    data = load_tabular(shared_file(f"heart_disease_uci/processed.{site}.data"))
    rows, negatives = KEPT[site]
    assert data.num_patients == rows
    assert int((data.target == 0).sum()) == negatives
    assert set(np.unique(data.target)) <= {0.0, 1.0}
    assert data.values.shape == (rows, len(COVARIATES))


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "site.data"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_in_dropped_columns_keeps_row_missing_elsewhere_drops_it(tmp_path: Path) -> None:
    path = _write(tmp_path, [
        "63,1,1,145,233,1,2,150,0,2.3,?,?,?,0",  # missing slope/ca/thal only: kept
        "67,1,4,160,?,0,2,108,1,1.5,2,3,3,2",  # missing chol: dropped
        "41,0,2,130,204,0,2,172,0,1.4,1,0,3,3",  # kept, num 3 -> positive
    ])
    data = load_tabular(path)
    assert data.num_patients == 2
    assert data.target.tolist() == [0.0, 1.0]
    assert data.values[:, COVARIATES.index("age")].tolist() == [63.0, 41.0]


def test_design_matrix_intercept_numeric_and_indicator_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, ["63,1,1,145,233,1,2,150,0,2.3,3,0,6,0",
                             "41,0,4,130,204,0,2,172,0,1.4,1,0,3,1"])
    x, y = design_matrix(load_tabular(path), ["age", "cp=4", "sex"])
    np.testing.assert_array_equal(x, [[1, 63, 0, 1], [1, 41, 1, 0]])
    np.testing.assert_array_equal(y, [0, 1])


def test_clipping_bounds_row_norm(tmp_path: Path) -> None:
    path = _write(tmp_path, ["200,1,4,400,900,1,2,300,1,12,1,0,3,1"])  # out of range values
    cols = ["age", "trestbps", "chol", "thalach", "oldpeak", "cp=4"]
    x, _ = design_matrix(load_tabular(path), cols, clip=True)
    assert np.linalg.norm(x[0]) <= row_norm_bound(cols) + 1e-9
    raw, _ = design_matrix(load_tabular(path), cols)
    assert np.linalg.norm(raw[0]) > row_norm_bound(cols)  # exact mode keeps recorded values


@pytest.mark.parametrize("columns", [[], ["age", "age"], ["intercept"], ["thal"], ["num"],
                                     ["cp=9"], ["age=1"], ["slope"]])
def test_columns_outside_allow_list_are_refused(columns: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_columns(columns)
    assert info.value.safe_reason


def test_missing_or_malformed_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_tabular(None)
    with pytest.raises(ConfigError):
        load_tabular(tmp_path / "absent.data")
    with pytest.raises(DataError):
        load_tabular(_write(tmp_path, ["1,2,3"]))
    with pytest.raises(DataError):
        load_tabular(_write(tmp_path, ["a,1,1,145,233,1,2,150,0,2.3,3,0,6,0"]))
    with pytest.raises(DataError):
        load_tabular(_write(tmp_path, ["?,1,1,145,233,1,2,150,0,2.3,3,0,6,0"]))
