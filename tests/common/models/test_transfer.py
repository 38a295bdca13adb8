"""init_from: pretrain on reconstruction, save as a coordinator does, fine-tune another head."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.models import build_model
from common.models.transfer import InitReport, init_from
from common.tasks import MULTICLASS, RECONSTRUCTION

SIZE = 8


def _pretrained(name: str, tmp_path: Path) -> tuple[nn.Module, Path]:
    """A few reconstruction SGD steps, saved like a coordinator's checkpoints/final.pt."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=RECONSTRUCTION.num_outputs(2), image_size=SIZE)
    RECONSTRUCTION.prepare_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.rand(16, 1, SIZE, SIZE)
    for _ in range(5):
        optimizer.zero_grad()
        RECONSTRUCTION.model_loss(model, x).mean().backward()
        optimizer.step()
    path = tmp_path / "checkpoints" / "final.pt"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    return model, path


def _classifier(name: str) -> nn.Module:
    torch.manual_seed(1)  # another seed: nothing equal by chance
    return build_model(name, num_classes=MULTICLASS.num_outputs(5), image_size=SIZE)


def test_a_classifier_starts_from_the_pretrained_autoencoder(tmp_path: Path) -> None:
    # Prepare
    pretrained, path = _pretrained("autoencoder", tmp_path)
    classifier = _classifier("autoencoder")
    head_before = classifier.state_dict()["head.weight"].clone()
    # Execute
    report = init_from(classifier, path)
    # Assert: encoder and decoder from the file, the 5-class head as initialised
    source, target = pretrained.state_dict(), classifier.state_dict()
    for name in source:
        if name.startswith(("encoder.", "decoder.")):
            torch.testing.assert_close(target[name], source[name], rtol=0, atol=0)
    assert torch.equal(target["head.weight"], head_before)
    assert target["head.weight"].shape != source["head.weight"].shape
    assert isinstance(report, InitReport)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(report.skipped) == set(report.kept) == {"head.weight", "head.bias"}
    assert report.num_loaded == len(source) - 2 and report.num_skipped == 2
    assert set(report.loaded) == set(source) - {"head.weight", "head.bias"}
    # the fine-tuning model still classifies
    assert classifier(torch.rand(3, 1, SIZE, SIZE)).shape == (3, 5)


@pytest.mark.parametrize("name", ["dbn", "dbm"])
def test_boltzmann_pretraining_transfers_all_but_the_head(name: str, tmp_path: Path) -> None:
    pretrained, path = _pretrained(name, tmp_path)
    classifier = _classifier(name)
    report = init_from(classifier, path)
    assert set(report.skipped) == {"head.weight", "head.bias"}
    for loaded in report.loaded:
        assert torch.equal(classifier.state_dict()[loaded], pretrained.state_dict()[loaded])


def test_an_unreadable_or_foreign_file_is_refused_with_a_reason(tmp_path: Path) -> None:
    model = _classifier("autoencoder")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a PyTorch state dict") as info:
        init_from(model, text)
    assert str(tmp_path) not in info.value.safe_reason
    with pytest.raises(ConfigError, match="does not exist"):
        init_from(model, tmp_path / "missing.pt")
    tensors = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], tensors)
    with pytest.raises(ConfigError, match="is not a PyTorch state dict"):
        init_from(model, tensors)
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module: refused by weights_only
    with pytest.raises(ConfigError, match="is not a PyTorch state dict"):
        init_from(model, pickled)


def test_nothing_in_common_is_refused_and_the_model_is_untouched(tmp_path: Path) -> None:
    model = _classifier("autoencoder")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = tmp_path / "cnn.pt"
    torch.save(build_model("cnn", image_size=16).state_dict(), other)
    with pytest.raises(ConfigError, match="no tensor of init-from checkpoint .* matches the model"):
        init_from(model, other)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_diverged_checkpoint_is_refused(tmp_path: Path) -> None:
    state = _classifier("autoencoder").state_dict()
    state["encoder.1.weight"] = torch.full_like(state["encoder.1.weight"], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    model = _classifier("autoencoder")
    before = model.state_dict()["decoder.0.weight"].clone()
    with pytest.raises(ConfigError, match="NaN or infinite"):
        init_from(model, path)
    assert torch.equal(model.state_dict()["decoder.0.weight"], before)
