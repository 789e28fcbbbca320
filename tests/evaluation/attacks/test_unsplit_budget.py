import pytest
from attack_setup import FEATURES

from splitunet.evaluation.attacks import AUTHORS_BUDGET, UnSplit


def test_authors_budget_has_the_reference_codes_schedule():
    # ege-erdogan/unsplit, model_inversion_demo.py: main_iters=1000, input_iters=100, model_iters=100;
    # attacks.py: Adam(lr=0.001, amsgrad=True) for both, lambda_tv=0.1, lambda_l2=1.
    attack = UnSplit.authors_budget(FEATURES)
    assert (attack.outer_iterations, attack.input_steps, attack.model_steps) == (1000, 100, 100)
    assert (attack.lr_input, attack.lr_model, attack.tv_weight, attack.l2_weight) == (1e-3, 1e-3, 0.1, 1.0)
    assert attack.amsgrad is True and attack.passes == 200_000 == AUTHORS_BUDGET["outer_iterations"] * 200
    assert UnSplit(FEATURES).passes == 120  # the short default: 60 x (1 + 1)


def test_a_truncated_authors_run_reports_its_settings(clean_features):
    attack = UnSplit.authors_budget(FEATURES, outer_iterations=1, input_steps=2, model_steps=2)
    reconstruction, stats = attack.reconstruct({0: clean_features[0][..., :16, :, :]})
    assert reconstruction.shape == (1, 1, 16, 32, 32)
    assert stats["amsgrad"] is True and stats["l2_weight"] == 1.0 and stats["passes"] == 4


@pytest.mark.parametrize("kwargs, message", [({"l2_weight": -1.0}, "l2_weight"), ({"amsgrad": 1}, "amsgrad")])
def test_new_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UnSplit(FEATURES, **kwargs)
