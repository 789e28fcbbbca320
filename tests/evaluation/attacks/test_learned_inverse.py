import pytest
import torch
from attack_setup import CROP, FEATURES

from splitunet.evaluation.attacks import InverseDecoder, LearnedInverse, UnSplit, build_encoder
from splitunet.evaluation.metrics import image_leakage

# Measured on the attacked crop after 60 steps of batch 4 on 20 auxiliary crops (3.5 s): SSIM 0.687 vs 0.261 for
# the mean image. The white-box optimisation reaches 0.896 on the same crop: a small learned inverse, trained on
# few crops, is the weaker attack without defense, and the stronger one under noise (test_defense_effect.py).
LEARNED = {"steps": 60, "batch_size": 4, "seed": 0}


def test_inverse_trained_with_the_known_encoder_beats_the_prior(
    site_encoder, aux_random_crops, clean_features, target_crop, prior
):
    attack = LearnedInverse(site_encoder, levels=[0], **LEARNED)
    fit = attack.fit(aux_random_crops)
    assert fit["train_mse_last"] < 0.5 * fit["train_mse_first"]
    reconstruction, stats = attack.reconstruct({0: clean_features[0]})
    assert reconstruction.shape == target_crop.shape and stats["levels"] == [0]
    leakage = image_leakage(reconstruction, target_crop, prior)["mean"]
    print(f"learned inverse x0: {leakage}, fit {fit}")
    assert leakage["ssim"] > leakage["ssim_prior"] + 0.2


@pytest.mark.parametrize("levels", [[0], [1, 2, 3, 4], [2, 4], [4]])
@pytest.mark.parametrize("size", [(32, 32, 32), (33, 34, 35)])
def test_decoder_output_has_the_input_size_for_any_levels_and_odd_sizes(levels, size):
    encoder = build_encoder((4, 4, 8, 8, 8), seed=0)
    with torch.no_grad():
        features = dict(enumerate(encoder(torch.zeros(2, 1, *size))))
        out = InverseDecoder(encoder.features, levels, width=4)({level: features[level] for level in levels}, size)
    assert out.shape == (2, 1, *size)


def test_reconstruct_needs_fit_and_the_trained_levels(site_encoder, clean_features):
    attack = LearnedInverse(site_encoder, levels=[1, 2], steps=1)
    with pytest.raises(ValueError, match="fit"):
        attack.reconstruct(clean_features)
    attack.fit(torch.zeros(2, 1, *CROP))
    with pytest.raises(ValueError, match=r"levels \[2\] are missing"):
        attack.reconstruct({1: clean_features[1]}, crop_size=CROP)


def test_feature_transform_is_applied_while_training(site_encoder):
    seen = []

    def transform(batch):
        seen.append(sorted(batch))
        return {level: torch.zeros_like(t) for level, t in batch.items()}

    attack = LearnedInverse(site_encoder, levels=[3, 4], steps=3, batch_size=1)
    attack.fit(torch.randn(3, 1, *CROP, generator=torch.Generator().manual_seed(0)), feature_transform=transform)
    assert seen == [[3, 4]] * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": 0}, "lr"), ({"levels": [5]}, "levels")],
)
def test_invalid_settings_fail_early(site_encoder, kwargs, message):
    settings = {"levels": [0], **kwargs}
    with pytest.raises(ValueError, match=message):
        LearnedInverse(site_encoder, **settings)
    with pytest.raises(ValueError, match="SiteEncoder"):
        LearnedInverse(torch.nn.Identity(), levels=[0])
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        LearnedInverse(site_encoder, levels=[0], steps=1).fit(torch.zeros(2, 2, *CROP))


def test_black_box_variant_trains_on_the_unsplit_surrogate(clean_features, aux_random_crops):
    unsplit = UnSplit(FEATURES, outer_iterations=2, seed=0)
    unsplit.reconstruct({0: clean_features[0]})
    attack = LearnedInverse(unsplit.surrogate, levels=[0], steps=2, batch_size=1)
    attack.fit(aux_random_crops[:2])
    reconstruction, _ = attack.reconstruct({0: clean_features[0]})
    assert reconstruction.shape == (1, 1, *CROP)
