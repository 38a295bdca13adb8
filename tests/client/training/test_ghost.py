"""Ghost-norm clipping of linear layers, and convolutions that keep their output gradients,
in the direct engine equal Opacus's per-sample norms and clipped sums (plain, sequence, tied
and recurrent layers; 1D, 2D and 3D convolutions by both norm methods; padded and empty
batches; float64), and the models registered for it train like Opacus's modes."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import TensorDataset

from client.training import ghost
from client.training.ghost import ghost_record
from client.training.per_sample import DirectDPOptimizer, DirectPerSampleGradients, unsupported_layers
from client.training.trainer import train_dp
from common.models.registry import build_model, get_spec

CLIP = 0.5


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "mean"
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Opacus: per-parameter squared per-sample norms and the clipped sums (no noise)."""
    ref = GradSampleModule(copy.deepcopy(model), loss_reduction=loss)
    nn.functional.cross_entropy(ref(x), y, reduction=loss).backward()
    named = [(k, p) for k, p in ref._module.named_parameters() if p.requires_grad]
    norms = {k: p.grad_sample.flatten(1).square().sum(1) for k, p in named}
    opt = DPOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=CLIP, expected_batch_size=4, loss_reduction=loss)
    opt.pre_step()
    return norms, {k: p.grad.clone() for k, p in named}


def _ghost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "mean", pad: int = 0
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The engine with ghost linear layers: squared norms (p.grad_sample) and clipped sums.

    ``pad`` extra rows (copies of the first sample) are run and trimmed as the trainer does.
    """
    net = copy.deepcopy(model)
    engine = DirectPerSampleGradients(net, loss_reduction="sum" if pad else loss, ghost_linear=True,
                                      ghost_conv=True)
    n = x.shape[0]
    try:
        if pad:
            padded = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
            # the trainer's padded path: a summed loss (per-sample terms as they are)
            nn.functional.cross_entropy(net(padded)[:n], y, reduction="sum").backward()
        else:
            nn.functional.cross_entropy(net(x), y, reduction=loss).backward()
    finally:
        engine.restore(rows=n if pad else None)
        engine.close()
    _ghost.conv_modes = {name: engine._conv_modes.get(id(m))  # type: ignore[attr-defined]
                         for name, m in net.named_modules() if id(m) in engine._conv_modes}
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    norms = {}
    for k, p in named:
        if ghost_record(p.grad_sample) is not None:
            norms[k] = p.grad_sample.clone()
        else:
            norms[k] = p.grad_sample.flatten(1).square().sum(1)
        assert p.grad_sample.shape[0] == n
    opt = DirectDPOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), noise_multiplier=0.0,
                            max_grad_norm=CLIP, expected_batch_size=4, loss_reduction=loss)
    opt.pre_step()
    return norms, {k: p.grad.clone() for k, p in named}


def _assert_equal(ours: tuple[dict[str, torch.Tensor], ...], ref: tuple[dict[str, torch.Tensor], ...],
                  rtol: float = 1e-4, atol: float = 1e-6) -> None:
    for mine, theirs in zip(ours, ref, strict=True):
        assert mine.keys() == theirs.keys()
        for k, v in theirs.items():
            assert mine[k].dtype == v.dtype, k
            torch.testing.assert_close(mine[k], v, rtol=rtol, atol=atol, msg=k)


class _Tied(nn.Module):
    """A linear layer used on the data and twice on hidden states, a sequence layer, GroupNorm."""

    def __init__(self, seq_width: int = 5) -> None:
        super().__init__()
        self.tied = nn.Linear(6, 6)
        self.norm = nn.GroupNorm(2, 6)
        self.seq = nn.Linear(6, seq_width)  # on [n, 3, 6]: a sequence input
        self.head = nn.Linear(seq_width, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.tied(x))
        h = torch.tanh(self.tied(self.norm(h)))
        h = self.tied(h)
        s = self.seq(torch.stack([h, h * 2, -h], 1))
        return self.head(s.mean(1))


def test_ghost_norms_and_clipped_sums_equal_opacus_for_tied_and_sequence_layers() -> None:
    torch.manual_seed(0)
    model = _Tied()
    x, y = torch.randn(7, 6) * 3, torch.randint(0, 3, (7,))
    ours, ref = _ghost(model, x, y), _reference(model, x, y)
    _assert_equal(ours, ref)
    assert bool((sum(ref[0].values()).sqrt() > CLIP).any())  # clipping mattered


def test_wide_sequences_take_the_materialising_norm_and_still_equal_opacus() -> None:
    torch.manual_seed(1)
    model = _Tied(seq_width=1)  # 3 positions * (6 + 1) > 6 * 1: norms via G^T X
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    _assert_equal(_ghost(model, x, y), _reference(model, x, y))


@pytest.mark.parametrize("name", ["mlp", "dsn", "dc-elm", "lstm", "gru"])
def test_linear_and_recurrent_models_equal_opacus(name: str) -> None:
    torch.manual_seed(2)
    model = build_model(name, in_channels=1, num_classes=2, image_size=12)
    assert not unsupported_layers(model)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 2, (6,))
    _assert_equal(_ghost(model, x, y), _reference(model, x, y))


@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_float64_and_summed_losses_equal_opacus(loss: str) -> None:
    torch.manual_seed(3)
    model = build_model("lstm", in_channels=1, num_classes=2, image_size=8).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 2, (4,))
    _assert_equal(_ghost(model, x, y, loss), _reference(model, x, y, loss), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "gru"])
def test_padded_batches_give_the_unpadded_norms_and_sums(name: str) -> None:
    torch.manual_seed(4)
    model = build_model(name, in_channels=1, num_classes=2, image_size=10)
    x, y = torch.randn(5, 1, 10, 10), torch.randint(0, 2, (5,))
    _assert_equal(_ghost(model, x, y, pad=3), _reference(model, x, y))


def test_an_empty_batch_clips_to_zero() -> None:
    tied = nn.Linear(6, 6)
    model = nn.Sequential(tied, nn.Tanh(), tied, nn.Tanh(), nn.Linear(6, 3))
    norms, sums = _ghost(model, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), loss="sum")
    assert all(v.shape == (0,) for v in norms.values())
    assert all(float(s.abs().sum()) == 0.0 for s in sums.values())


def test_a_parameter_shared_by_two_modules_is_not_ghost_clipped() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    b.weight = nn.Parameter(a.weight[:2].detach().clone())
    shared = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    other.weight = shared.weight  # tied by parameter: the buffer path sums the two uses
    model = nn.Sequential(shared, nn.Tanh(), other, nn.Tanh(), b)
    engine = DirectPerSampleGradients(model, ghost_linear=True)
    try:
        nn.functional.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
    finally:
        engine.restore()
        engine.close()
    assert ghost_record(shared.weight.grad_sample) is None and shared.weight.grad_sample.shape == (3, 4, 4)
    assert ghost_record(b.weight.grad_sample) is not None


def test_two_backward_passes_without_a_step_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    engine = DirectPerSampleGradients(model, ghost_linear=True)
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    nn.functional.cross_entropy(model(x), y).backward()
    engine.restore()
    with pytest.raises(RuntimeError, match="earlier backward pass"):
        nn.functional.cross_entropy(model(x), y).backward()
    engine.close()


@pytest.mark.parametrize("name", ["mlp", "lstm", "dbn"])
def test_models_registered_for_ghost_direct_train_like_opacus_hooks(name: str) -> None:
    """Same seed, no noise: the same Poisson batches, clipped steps and weights as Opacus."""
    assert get_spec(name).grad_sample_mode == "direct"
    torch.manual_seed(5)
    model = build_model(name, in_channels=1, num_classes=2, image_size=8)
    data = TensorDataset(torch.rand(40, 1, 8, 8), torch.randint(0, 2, (40,)))
    kw = dict(epochs=1, batch_size=8, learning_rate=0.1, noise_multiplier=0.0, max_grad_norm=0.3,
              delta=1e-5, seed=3, device="cpu")
    ours = train_dp(model, data, grad_sample_mode="direct", **kw)
    ref = train_dp(model, data, grad_sample_mode="hooks", **kw)
    assert ours.steps == ref.steps
    for k, v in ref.state_dict.items():
        torch.testing.assert_close(ours.state_dict[k], v, rtol=1e-4, atol=1e-5, msg=k)


class _SharedGradient(nn.Module):
    """Two layers whose outputs are summed: autograd hands both the same gradient tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x) + self.b(x)))


def test_layers_handed_one_gradient_tensor_are_clipped_independently() -> None:
    torch.manual_seed(6)
    model = _SharedGradient()
    x, y = torch.randn(6, 5) * 3, torch.randint(0, 2, (6,))
    _assert_equal(_ghost(model, x, y, loss="sum"), _reference(model, x, y, loss="sum"))


class _Convs(nn.Module):
    """Convolutions that keep per-sample gradients (a large map), their output gradients with
    norms by Gram matrices (small maps, many weights) or by per-sample gradients (a mid-sized
    map), one of them used twice (tied), a Conv1d, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)  # 10x10: per-sample gradients (buffer)
        self.mid = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # 5x5: output gradients, "sample"
        self.norm = nn.GroupNorm(4, 16)
        self.small = nn.Conv2d(16, 16, 3, padding=1)  # 2x2: "gram"; used twice
        self.seq = nn.Conv1d(16, 8, 3, padding=1)  # length 4: "gram"
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
        h = nn.functional.avg_pool2d(torch.relu(self.norm(self.mid(h))), 2)
        h = self.small(torch.tanh(self.small(h)))
        h = torch.tanh(self.seq(h.flatten(2)))
        return self.head(h.mean(2))


@pytest.fixture
def all_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let convolutions of any size keep their output gradients (the tests' layers are small)."""
    monkeypatch.setattr(ghost, "CONV_MIN_WEIGHTS", 0)


def test_convolutions_keeping_output_gradients_equal_opacus(all_convolutions: None) -> None:
    torch.manual_seed(7)
    model = _Convs()
    x, y = torch.randn(6, 1, 10, 10) * 2, torch.randint(0, 3, (6,))
    ours, ref = _ghost(model, x, y), _reference(model, x, y)
    assert _ghost.conv_modes == {"stem": None, "mid": "sample", "small": "gram", "seq": "gram"}  # type: ignore[attr-defined]
    _assert_equal(ours, ref)
    assert bool((sum(ref[0].values()).sqrt() > CLIP).any())  # clipping mattered


def test_conv3d_and_float64_and_padded_convolutions_equal_opacus(all_convolutions: None) -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                          nn.Conv3d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(64, 2)).double()
    x, y = torch.randn(5, 1, 4, 4, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    _assert_equal(_ghost(model, x, y, "sum"), _reference(model, x, y, "sum"), rtol=1e-10, atol=1e-12)
    assert _ghost.conv_modes == {"0": None, "3": "sample"}  # type: ignore[attr-defined]
    conv = _Convs()
    x2, y2 = torch.randn(5, 1, 10, 10), torch.randint(0, 3, (5,))
    _assert_equal(_ghost(conv, x2, y2, pad=3), _reference(conv, x2, y2))


@pytest.mark.parametrize("name", ["cnn", "resnet", "densenet"])
def test_convolutional_models_equal_opacus_with_output_gradients_kept(name: str, all_convolutions: None) -> None:
    torch.manual_seed(9)
    model = build_model(name, in_channels=1, num_classes=2, image_size=16)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 2, (4,))
    _assert_equal(_ghost(model, x, y), _reference(model, x, y))
    assert any(_ghost.conv_modes.values())  # type: ignore[attr-defined]  # some keep output gradients


def test_small_convolutions_keep_per_sample_gradients_and_large_ones_need_small_maps() -> None:
    small, large = nn.Conv2d(16, 16, 3), nn.Conv2d(64, 64, 3)  # 2,304 and 36,864 weights
    assert ghost.conv_keeps_output_gradients(small, torch.zeros(2, 16, 2, 2)) is None
    assert ghost.conv_keeps_output_gradients(large, torch.zeros(2, 64, 4, 4)) == "gram"
    assert ghost.conv_keeps_output_gradients(large, torch.zeros(2, 64, 12, 12)) == "sample"
    assert ghost.conv_keeps_output_gradients(large, torch.zeros(2, 64, 28, 28)) is None  # 50,176 > 36,864
    torch.manual_seed(10)
    model = build_model("resnet", in_channels=1, num_classes=2, image_size=28)
    _ghost(model, torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    kept = {k for k, v in _ghost.conv_modes.items() if v}  # type: ignore[attr-defined]
    assert kept and all(dict(model.named_modules())[k].weight.numel() >= ghost.CONV_MIN_WEIGHTS for k in kept)


def _noisy_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, one_pass: bool, steps: int = 2
                ) -> list[list[torch.Tensor]]:
    """``steps`` engine steps with noise; the gradients after each. ``one_pass=False`` runs
    Opacus's sequence of calls (clip, noise, scale) instead of the one-pass step."""
    net = copy.deepcopy(model)
    engine = DirectPerSampleGradients(net, loss_reduction="sum", ghost_linear=True, ghost_conv=True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = DirectDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.3, max_grad_norm=CLIP,
                            expected_batch_size=4, generator=torch.Generator().manual_seed(11))
    grads, kept = [], set()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        try:
            nn.functional.cross_entropy(net(x[step:]), y[step:], reduction="sum").backward()
        finally:
            engine.restore()
        if one_pass:
            assert opt.pre_step() is True
            kept.add(opt._flats[0].data_ptr())  # type: ignore[index]
        else:
            opt.clip_and_accumulate()
            opt.add_noise()
            opt.scale_grad()
        grads.append([p.grad.clone() for p in params])
    engine.close()
    assert len(kept) == (1 if one_pass else 0)  # one pair of vectors, reused at every step
    return grads


def test_one_pass_step_equals_opacus_sequence_with_noise(all_convolutions: None) -> None:
    """Buffer columns, a ghost linear head and convolutions keeping output gradients: the
    one-pass step gives Opacus's sequence's gradients, the same noise draw included, at every
    step (its vectors are kept and reused between steps, over batches of different sizes)."""
    torch.manual_seed(12)
    model = _Convs()
    x, y = torch.randn(7, 1, 10, 10), torch.randint(0, 3, (7,))
    ours, ref = _noisy_step(model, x, y, True), _noisy_step(model, x, y, False)
    for mine, theirs in zip(ours, ref, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ghost_linear_layers_run_one_autograd_function_and_are_given_back_on_close() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    engine = DirectPerSampleGradients(model, ghost_linear=True)
    assert "forward" in model[0].__dict__  # patched while training
    out = model(x)
    assert type(out.grad_fn).__name__ == "_GhostLinearFunctionBackward"
    copied = copy.deepcopy(model)  # a copy made while training is not the engine's: plain linear
    assert copied(x).grad_fn is not None and "Ghost" not in type(copied(x).grad_fn).__name__
    nn.functional.cross_entropy(out, y).backward()
    engine.restore()
    assert all(ghost_record(p.grad_sample) is not None for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # no batch weight gradient formed
    engine.close()
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__
    torch.testing.assert_close(model(x), copied(x))



def test_norms_and_buffer_are_plain_tensors_when_the_data_are_monai_metatensors(
        all_convolutions: None) -> None:
    """MONAI's MetaTensor (a volume's type) copies a tensor's Python attributes onto what is
    computed from it: the records must sit on plain tensors, or one layer's record reaches
    the clipping factors and other parameters (a 3D CNN's step failed so). The step equals
    the step on plain data."""
    from monai.data import MetaTensor

    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                          nn.Conv3d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(128, 3))
    x, y = torch.randn(7, 1, 4, 4, 4), torch.randint(0, 3, (7,))
    engine = DirectPerSampleGradients(model, loss_reduction="sum", ghost_linear=True, ghost_conv=True)
    nn.functional.cross_entropy(model(MetaTensor(x)), y, reduction="sum").backward()
    engine.restore()
    assert engine._conv_modes[id(model[3])] == "gram"  # its norms are computed from the data
    assert all(type(p.grad_sample) is torch.Tensor for p in model.parameters())
    engine.close()
    plain, meta = (_noisy_step(model, data, y, True) for data in (x, MetaTensor(x)))
    for mine, theirs in zip(meta, plain, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a.as_subclass(torch.Tensor), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lstm", "cnn"])
def test_training_leaves_no_reference_cycle_holding_tensors(name: str) -> None:
    # A ghost record on p.grad_sample refers back to its layer's parameters: left on the
    # trained copy's parameters after the last step, that cycle kept the record's tensors
    # until the cyclic GC ran, and a node's memory grew round after round.
    import gc

    torch.manual_seed(18)
    model = build_model(name, in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.randn(48, 1, 16, 16), torch.randint(0, 2, (48,)))
    kw = dict(epochs=1, batch_size=16, learning_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0,
              delta=1e-5, seed=7, grad_sample_mode="direct")
    train_dp(model, data, **kw)  # first calls (lazy state) outside the measured one
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        train_dp(model, data, **kw)
        gc.collect()
        tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert tensors == []


@pytest.mark.parametrize("ghost_conv", [False, True])
def test_a_backward_pass_lets_go_of_the_layer_inputs_its_hooks_kept(ghost_conv: bool) -> None:
    # A hooked layer's output-gradient hook lives on the output's autograd node, which the
    # loss's graph keeps after backward (a training loop holds the loss until its next
    # forward pass): an input the hook still held stayed alive through the next step's
    # forward pass, a whole pass's activations on top of the next pass's.
    import gc

    torch.manual_seed(19)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(32, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 2))
    inputs: list[tuple[int, tuple[int, ...]]] = []

    def note(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append((args[0].untyped_storage().data_ptr(), tuple(args[0].shape)))

    for layer in list(net)[2::2]:  # the layers after the first (its input is the data)
        layer.register_forward_pre_hook(note)
    engine = DirectPerSampleGradients(net, loss_reduction="sum", ghost_conv=ghost_conv)
    try:
        loss = nn.functional.cross_entropy(net(torch.randn(6, 1, 8, 8)), torch.randint(0, 2, (6,)),
                                           reduction="sum")
        loss.backward()
    finally:
        engine.restore()
    kinds = {ghost_record(p.grad_sample) is not None for p in net.parameters()}  # type: ignore[attr-defined]
    assert kinds == ({True, False} if ghost_conv else {False})
    for p in net.parameters():  # the optimiser's zero_grad
        p.grad_sample = None  # type: ignore[attr-defined]
    gc.collect()
    held = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)
            and (o.untyped_storage().data_ptr(), tuple(o.shape)) in inputs]
    engine.close()
    assert loss.grad_fn is not None  # the graph is still referenced
    assert len(inputs) == 3 and held == []
