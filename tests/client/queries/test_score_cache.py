"""The node's score cache: one scoring per (plan, model, held-out split), never a stale hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.data.node_data import SplitArrays
from client.queries import scoring
from client.queries.registry import QueryRequest
from client.queries.scoring import HeldOutImages, patient_scores
from common import messages as k
from common.config import NodeConfig, TrainPlan

PLAN = TrainPlan(task="binary", image_size=16, model="cnn", run_id="cache-test")


def _arrays(seed: int, plan: TrainPlan = PLAN) -> ArrayRecord:
    from client.app import build_plan_model

    torch.manual_seed(seed)
    return ArrayRecord(build_plan_model(plan).state_dict())


def _request(arrays: ArrayRecord, plan: TrainPlan = PLAN) -> QueryRequest:
    return QueryRequest(name="metrics", node=NodeConfig(data_dir=Path(".")), plan=plan,
                        split=k.SPLIT_TEST, config=ConfigRecord({}),
                        content=RecordDict({k.ARRAYS: arrays}))


def _split(seed: int) -> HeldOutImages:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(12, 1, 16, 16, generator=gen)
    labels = torch.tensor([0, 1] * 6)
    index = torch.arange(12) // 2
    return HeldOutImages(split=SplitArrays(images, labels, index, 6), device=torch.device("cpu"))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = scoring.evaluate_model

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "evaluate_model", counting)
    scoring._score_cache.clear()
    return calls


def test_the_same_model_and_split_are_scored_once(counted: list[int]) -> None:
    first = patient_scores(_request(_arrays(1)), _split(0), k.ARRAYS)
    first[0][:] = -1.0  # a caller changing its copy does not change the cache
    again = patient_scores(_request(_arrays(1)), _split(0), k.ARRAYS)
    assert len(counted) == 1
    scoring._score_cache.clear()
    fresh = patient_scores(_request(_arrays(1)), _split(0), k.ARRAYS)
    np.testing.assert_array_equal(again[0], fresh[0])
    np.testing.assert_array_equal(again[1], fresh[1])
    assert again[0].shape == (6,) and np.all((again[0] >= 0) & (again[0] <= 1))


def test_another_model_split_or_plan_is_scored_again(counted: list[int]) -> None:
    patient_scores(_request(_arrays(1)), _split(0), k.ARRAYS)
    other_model = patient_scores(_request(_arrays(2)), _split(0), k.ARRAYS)
    other_split = patient_scores(_request(_arrays(1)), _split(5), k.ARRAYS)
    other_plan = TrainPlan(task="binary", image_size=16, model="cnn", run_id="another-run")
    patient_scores(_request(_arrays(1), other_plan), _split(0), k.ARRAYS)
    assert len(counted) == 4
    assert not np.array_equal(other_model[0], other_split[0])


def test_the_cache_keeps_only_the_last_few(counted: list[int]) -> None:
    for seed in range(scoring.SCORE_CACHE_SIZE + 1):
        patient_scores(_request(_arrays(seed)), _split(0), k.ARRAYS)
    assert len(scoring._score_cache) == scoring.SCORE_CACHE_SIZE
    patient_scores(_request(_arrays(0)), _split(0), k.ARRAYS)  # the oldest was dropped
    assert len(counted) == scoring.SCORE_CACHE_SIZE + 2
