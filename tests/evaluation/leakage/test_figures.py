import torch

from splitunet.evaluation.leakage import plot_reconstruction_grid, plot_tradeoff

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_reconstruction_grid(tmp_path):
    original = torch.rand(1, 12, 14, 16)
    rows = {"x0": original * 2 + 1, "x1": torch.rand(1, 12, 14, 16)}
    path = plot_reconstruction_grid(original, rows, tmp_path / "sub" / "grid.png", "title")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_tradeoff_plot(tmp_path):
    points = [
        {"label": "no defense", "dice": 0.8, "ssim": 0.95, "ssim_prior": 0.3},
        {"label": "noise", "dice": 0.7, "ssim": 0.4, "ssim_prior": 0.3},
        {
            "label": "with intervals",
            "dice": 0.75,
            "dice_interval": {"low": 0.7, "high": 0.8},
            "ssim": 0.5,
            "ssim_interval": {"low": float("nan"), "high": float("nan")},  # one seed: no bar, still a point
            "ssim_prior": 0.3,
        },
    ]
    assert plot_tradeoff(points, tmp_path / "tradeoff.png").read_bytes().startswith(PNG_MAGIC)
