"""The ensemble's node steps: dropout added without new weights (training and MC-dropout
passes), the stacker's frozen members and trainable head, and the clear refusal of
MC-dropout for a model without dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.paradigms.ensemble import Stacker, add_dropout, has_dropout
from common.config import TrainPlan
from common.errors import ConfigError
from common.models import build_model
from common.paradigms import get_paradigm, read_options


def _cnn() -> torch.nn.Module:
    return build_model("cnn", in_channels=1, num_classes=2, image_size=16, spatial_dims=2)


def test_dropout_is_a_hook_active_in_train_mode_only() -> None:
    # Prepare
    torch.manual_seed(0)
    model = _cnn()
    keys = list(model.state_dict())
    x = torch.randn(4, 1, 16, 16)
    # Execute
    add_dropout(model, 0.5)
    # Assert: same weights and names; stochastic in train mode, deterministic in eval mode
    assert list(model.state_dict()) == keys and not has_dropout(model)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = _cnn()
    assert add_dropout(plain, 0.0) is plain  # rate 0: the model unchanged, no hook added
    last = [m for m in plain.modules() if isinstance(m, nn.Linear)][-1]
    assert not last._forward_pre_hooks


def test_the_stacker_trains_its_head_only_and_starts_as_the_mean_logit() -> None:
    # Prepare
    members = [_cnn(), _cnn()]
    stacker = Stacker(members).train()
    x = torch.randn(3, 1, 16, 16)
    # Execute
    out = stacker(x)
    # Assert
    margins = torch.stack([(m.eval()(x)[:, 1] - m(x)[:, 0]) for m in members], dim=1)
    assert torch.allclose(out[:, 1], margins.mean(dim=1), atol=1e-6)
    assert torch.equal(out[:, 0], torch.zeros(3))
    assert [n for n, p in stacker.named_parameters() if p.requires_grad] == ["head.weight",
                                                                              "head.bias"]
    assert not any(m.training for m in stacker.members)


def test_mc_dropout_without_dropout_is_refused_with_the_fix() -> None:
    # Prepare
    paradigm = get_paradigm("ensemble")
    plan = TrainPlan(num_rounds=1, image_size=16)
    # Execute / Assert
    with pytest.raises(ConfigError, match="-P dropout=0.2"):
        paradigm.check(plan, read_options(paradigm, '{"uncertainty":"mc-dropout"}'))
    paradigm.check(plan, read_options(paradigm, '{"dropout":0.2,"uncertainty":"both"}'))
    paradigm.check(plan, read_options(paradigm, "{}"))
