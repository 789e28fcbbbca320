"""site.nopeek: the distance correlation matches an independent computation, the penalty's gradient reaches the
encoder through the site trainer's backward, and settings that cannot hold are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitunet.checkpoint import load_checkpoint, save_checkpoint
from splitunet.data.party_data import ModalityFolder
from splitunet.data.sampling import RandomCropPlanner
from splitunet.dp import DPSettings
from splitunet.errors import SplitUNetConfigError
from splitunet.site.nopeek import NoPeekPenalty, NoPeekSettings, distance_correlation, input_cells
from splitunet.site.trainer import SiteTrainer
from splitunet.wire.model_config import SplitModelConfig

CONFIG = SplitModelConfig(features=(4, 8, 8, 16, 16), seed=3)


def _reference_dcor(x: np.ndarray, y: np.ndarray) -> float:
    """Székely, Rizzo and Bakirov (2007), eqs. 2.8-2.10, by explicit loops in float64."""
    n = len(x)

    def centred(samples):
        a = np.array([[np.linalg.norm(samples[k] - samples[m]) for m in range(n)] for k in range(n)])
        rows = [sum(a[k]) / n for k in range(n)]
        columns = [sum(a[:, m]) / n for m in range(n)]
        grand = sum(rows) / n
        return np.array([[a[k, m] - rows[k] - columns[m] + grand for m in range(n)] for k in range(n)])

    a, b = centred(x), centred(y)
    v_xy = sum(a[k, m] * b[k, m] for k in range(n) for m in range(n)) / n**2
    v_xx = sum(a[k, m] ** 2 for k in range(n) for m in range(n)) / n**2
    v_yy = sum(b[k, m] ** 2 for k in range(n) for m in range(n)) / n**2
    return float(np.sqrt(v_xy / np.sqrt(v_xx * v_yy)))


@pytest.mark.parametrize("dependence", [0.0, 0.5, 3.0])
def test_distance_correlation_matches_the_definition(dependence):
    rng = np.random.default_rng(int(dependence * 10))
    x = rng.normal(size=(40, 5))
    # y depends on x non-linearly (and not at all for dependence 0).
    y = np.concatenate([dependence * np.sin(x[:, :2]) ** 2, rng.normal(size=(40, 1))], axis=1)
    got = distance_correlation(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert float(got) == pytest.approx(_reference_dcor(x, y), abs=1e-4)


def test_distance_correlation_is_one_for_a_similarity_and_zero_for_a_constant():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))
    assert float(distance_correlation(x, 3.0 * x @ rotation + 7.0)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, torch.ones(30, 2))) == 0.0
    with pytest.raises(ValueError, match="needs"):
        distance_correlation(x, torch.ones(29, 2))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_input_cells_pair_each_position_with_the_voxels_under_it(level):
    batch = torch.randn(2, 1, 8, 12, 16, generator=torch.Generator().manual_seed(level))
    cells = input_cells(batch, level)
    s = 2**level
    assert cells.shape == (2, s**3, 8 // s, 12 // s, 16 // s)
    for b, i, j, k in [(0, 0, 0, 0), (1, 1, 2, 3), (1, 8 // s - 1, 12 // s - 1, 16 // s - 1)]:
        block = batch[b, 0, i * s : (i + 1) * s, j * s : (j + 1) * s, k * s : (k + 1) * s]
        assert torch.equal(torch.sort(cells[b, :, i, j, k]).values, torch.sort(block.flatten()).values)
    with pytest.raises(ValueError, match="divisible"):
        input_cells(torch.zeros(1, 1, 6, 8, 8), 2)


def test_minimising_the_penalty_decorrelates_a_convolution_from_its_input():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh())
    # Smooth, as images are: a voxel's neighbours tell of it, so a 3x3x3 convolution's output does too at first.
    batch = torch.nn.functional.avg_pool3d(torch.randn(2, 1, 20, 20, 20), 5, stride=1)
    penalty = NoPeekPenalty(NoPeekSettings(weight=1.0, positions=128), seed=0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    values = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = penalty(batch, {0: layer(batch)})
        loss.backward()
        optimizer.step()
        values.append(penalty.last[0])
    assert values[0] > 0.5
    assert np.mean(values[-5:]) < 0.5 * values[0]


def test_nopeek_settings_are_checked():
    assert NoPeekSettings.from_config(None) is None
    assert NoPeekSettings.from_config({"weight": 0.1, "levels": [2, 0, 2]}).levels == (0, 2)
    assert NoPeekSettings().to_dict() == {"weight": NoPeekSettings().weight, "positions": 256, "levels": None}
    for bad, message in [
        ({"weight": 0}, "weight"),
        ({"weight": True}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"positions": 3}, "positions"),
        ({"levels": [5]}, "levels"),
        ({"levels": []}, "levels"),
        ({"strength": 1}, "unknown settings"),
        ([0.1], "mapping"),
    ]:
        with pytest.raises(SplitUNetConfigError, match=message):
            NoPeekSettings.from_config(bad)


def _trainer(tiny_parties, nopeek: NoPeekSettings | None) -> SiteTrainer:
    trainer = SiteTrainer(ModalityFolder(tiny_parties / "t1", "t1", party="site-2"), "test-secret")
    trainer.build(CONFIG, init_seed=5)
    if nopeek is not None:
        trainer.plan_nopeek(nopeek)
    return trainer


def _plan(trainer):
    shapes = {key: info["shape"] for key, info in trainer.describe_cases().items()}
    return RandomCropPlanner(shapes, (32, 32, 32), batch_size=2, seed=0).next_plan()


def test_the_site_applies_the_servers_gradient_plus_the_penalty(tiny_parties):
    settings = NoPeekSettings(weight=0.3, positions=64)
    trainer = _trainer(tiny_parties, settings)
    plan = _plan(trainer)
    trainer.forward(plan)
    grads = {level: torch.randn_like(f) * 1e-3 for level, f in trainer._pending.items()}
    # The gradient expected: the server's through the graph, plus the penalty's at the same positions (the same
    # generator state), computed apart from the trainer.
    params = [p for p in trainer.encoder.parameters()]
    expected_penalty = NoPeekPenalty(settings, seed=0)
    expected_penalty.generator.set_state(trainer.nopeek.generator.get_state())
    outputs = list(trainer._pending.values())
    from_server = torch.autograd.grad(outputs, params, [grads[level] for level in trainer._pending], retain_graph=True)
    from_penalty = torch.autograd.grad(
        expected_penalty(trainer._pending_batch, trainer._pending), params, retain_graph=True
    )
    before = [p.detach().clone() for p in params]
    trainer.backward(grads)
    expected = [server_part + penalty_part for server_part, penalty_part in zip(from_server, from_penalty)]
    # One backward pass against two: the same sums in another order, in float32 (the biases before instance norm
    # have gradients of rounding size only, hence a tolerance on the scale of the largest gradient).
    scale = max(float(gradient.abs().max()) for gradient in expected)
    assert max(float(gradient.abs().max()) for gradient in from_penalty) > 0.1 * scale  # the penalty counts
    for parameter, gradient in zip(params, expected):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-3, atol=1e-4 * scale)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    assert set(trainer.nopeek.last) == set(CONFIG.sent_levels)
    assert trainer.nopeek.last == expected_penalty.last


def test_without_nopeek_the_site_applies_the_servers_gradient_alone(tiny_parties):
    trainer = _trainer(tiny_parties, None)
    trainer.forward(_plan(trainer))
    grads = {level: torch.full_like(f, 1e-3) for level, f in trainer._pending.items()}
    params = list(trainer.encoder.parameters())
    expected = torch.autograd.grad(list(trainer._pending.values()), params, list(grads.values()), retain_graph=True)
    trainer.backward(grads)
    for parameter, gradient in zip(params, expected):
        torch.testing.assert_close(parameter.grad, gradient)


def _step(trainer, plan) -> dict[int, float]:
    trainer.forward(plan)
    trainer.backward({level: torch.full_like(f, 1e-3) for level, f in trainer._pending.items()})
    return dict(trainer.nopeek.last)


def test_a_resumed_site_draws_the_positions_the_interrupted_run_would_have(tiny_parties, tmp_path):
    settings = NoPeekSettings(weight=0.3, positions=64)
    interrupted = _trainer(tiny_parties, settings)
    plans = RandomCropPlanner(
        {key: info["shape"] for key, info in interrupted.describe_cases().items()}, (32, 32, 32), batch_size=2, seed=0
    )
    first, second = plans.next_plan(), plans.next_plan()
    _step(interrupted, first)
    save_checkpoint(interrupted.state_dict(), tmp_path / "site.pt")
    resumed = _trainer(tiny_parties, settings)
    resumed.load_state_dict(load_checkpoint(tmp_path / "site.pt"))
    restarted = _trainer(tiny_parties, settings)
    restarted.load_state_dict({**load_checkpoint(tmp_path / "site.pt"), "nopeek_positions": None})
    expected = _step(interrupted, second)
    assert _step(resumed, second) == expected
    # Without the saved draws the site would restart them from its seed: other positions, other correlations.
    assert _step(restarted, second) != expected


def test_nopeek_is_refused_with_dp_sgd_and_on_levels_not_sent(tiny_parties):
    pytest.importorskip("opacus")
    settings = DPSettings(target_epsilon=8.0, max_grad_norm=0.1, poisson_sampling=False)
    with_dp = _trainer(tiny_parties, None)
    with_dp.plan_privacy(settings, steps=5)
    with pytest.raises(SplitUNetConfigError, match="NoPeek and DP-SGD cannot be combined"):
        with_dp.plan_nopeek(NoPeekSettings())
    with_nopeek = _trainer(tiny_parties, NoPeekSettings())
    with pytest.raises(SplitUNetConfigError, match="NoPeek and DP-SGD cannot be combined"):
        with_nopeek.plan_privacy(settings, steps=5)
    no_x0 = SiteTrainer(ModalityFolder(tiny_parties / "t1", "t1", party="site-2"), "test-secret")
    no_x0.build(SplitModelConfig(features=CONFIG.features, skip_levels=(1, 2, 3)))
    with pytest.raises(SplitUNetConfigError, match=r"site-2: nopeek penalises levels \[0\]"):
        no_x0.plan_nopeek(NoPeekSettings(levels=(0,)))
