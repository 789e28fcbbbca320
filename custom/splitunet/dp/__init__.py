"""Differentially private training (DP-SGD, Abadi et al. 2016) of what a hospital or a split site trains, with Opacus.

One concept per module:

- :mod:`~splitunet.dp.dp_settings`: the job's ``"dp"`` settings, validated (no torch, no Opacus);
- :mod:`~splitunet.dp.epsilon_budget`: the whole job's epsilon projected before training by Opacus' accountant;
- :mod:`~splitunet.dp.dp_model`: the layer changes DP-SGD needs, found by Opacus' ``ModuleValidator`` and recorded;
- :mod:`~splitunet.dp.private_training`: Opacus' ``PrivacyEngine`` around model, optimiser and loader;
- :mod:`~splitunet.dp.private_split`: Opacus' hooks, ``DPOptimizer`` and accountant for a split part trained through
  the gradients the server returns, one clipped gradient per case and step;
- :mod:`~splitunet.dp.site_cap`: a site's ``max_epsilon``, checked against the projection at setup;
- :mod:`~splitunet.dp.party_record`: a split party's admission under its cap, and what its ``results.json`` and log
  say about its DP-SGD;
- :mod:`~splitunet.dp.opacus_extra`: whether Opacus is installed, and loading a module that needs it;
- :mod:`~splitunet.dp.step_time`: seconds per step with and without DP-SGD;
- :mod:`~splitunet.dp.noise_plan`: the noise a target epsilon costs hospitals of given sizes (no training).

Opacus is the ``dp`` extra; each name loads its module on first use (see :mod:`splitunet.lazy_exports`), so reading
settings or a site's cap needs no Opacus. What epsilon covers, and what it does not, is in ``docs/dp.md``.
"""

from splitunet.lazy_exports import lazy_exports

_EXPORTS = {
    "ACCOUNTANTS": "dp_settings",
    "DPSettings": "dp_settings",
    "default_delta": "dp_settings",
    "DPBudget": "epsilon_budget",
    "opacus_sample_rate": "epsilon_budget",
    "project_epsilon": "epsilon_budget",
    "plan_budget": "epsilon_budget",
    "plan_split_budget": "epsilon_budget",
    "DPModelChanges": "dp_model",
    "prepare_for_dp": "dp_model",
    "BudgetExhausted": "private_training",
    "PrivateTraining": "private_training",
    "private_generator": "private_training",
    "PrivateSplitTraining": "private_split",
    "first_row_of_each_case": "private_split",
    "EPSILON_CAP_KEY": "site_cap",
    "EpsilonCap": "site_cap",
    "EpsilonCapExceeded": "site_cap",
    "read_epsilon_cap": "site_cap",
    "check_epsilon_cap": "site_cap",
    "PrivacyRecord": "party_record",
    "opacus_installed": "opacus_extra",
    "dp_module": "opacus_extra",
    "describe_budget": "party_record",
    "NoisePlanRow": "noise_plan",
    "noise_plan": "noise_plan",
    "noise_plan_markdown": "noise_plan",
    "admit_job": "party_record",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
