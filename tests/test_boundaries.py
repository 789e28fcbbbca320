"""The package's boundaries, checked where they matter: in a fresh interpreter, on what is actually loaded.

A site that builds its executor and its privacy filters must not load the server's workflows, its trainer, the
evaluation side or the operator tools, and must not need the optional packages (Opacus, plotting, nilearn,
TensorBoard). The server's workflows must not load the site trainer. Nothing on the training path loads attacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Packages a site does not install (pyproject extras); the site-role check runs with them made unimportable.
OPTIONAL = ("opacus", "nilearn", "matplotlib", "scipy", "tensorboard")

_BLOCK_OPTIONAL = f"""
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent in this test)", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def _loaded_after(code: str, block_optional: bool = False) -> set[str]:
    """The modules loaded by ``code`` in a fresh interpreter (its last line must leave nothing on stdout)."""
    script = (_BLOCK_OPTIONAL if block_optional else "") + textwrap.dedent(code) + "\nimport json, sys\n"
    script += "print(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _under(modules: set[str], *prefixes: str) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


SITE_ROLE = """
from nvflare.fuel.utils.class_utils import load_class
# What a site's job config and privacy policy name, loaded the way FLARE loads them.
for path in ["splitunet.flare.SplitSiteExecutor", "splitunet.filters.QuantizeFeatures",
             "splitunet.filters.FeatureGuard", "splitunet.filters.ClippedGaussianNoise",
             "splitunet.filters.ChannelDropout", "splitunet.filters.TopKSparsify",
             "splitunet.filters.BlockSkipLevels", "splitunet.filters.WireAudit",
             "splitunet.filters.GradientDetector"]:
    load_class(path)
import splitunet.site.trainer
"""


@pytest.fixture(scope="module")
def site_modules():
    return _loaded_after(SITE_ROLE, block_optional=True)


def test_a_site_never_loads_the_server_side(site_modules):
    assert (
        _under(
            site_modules,
            "splitunet.server",
            "splitunet.flare.controller",
            "splitunet.flare.inference_controller",
            "splitunet.flare.site_tasks",
            "splitunet.networks.server_decoder",
        )
        == []
    )


def test_a_site_never_loads_the_evaluation_side_or_the_operator_tools(site_modules):
    assert _under(site_modules, "splitunet.evaluation", "splitunet.tools") == []


def test_a_site_runs_without_the_optional_packages(site_modules):
    assert "splitunet.flare.executor" in site_modules and "splitunet.filters.clipped_gaussian_noise" in site_modules
    assert _under(site_modules, *OPTIONAL) == []


def test_the_noise_filter_names_the_extra_it_needs_for_accounting_when_opacus_is_absent():
    code = """
    from splitunet.filters import ClippedGaussianNoise
    noise = ClippedGaussianNoise(noise_multiplier=1.0, clip_norm=1.0)
    try:
        noise.epsilon(num_levels=5)
    except ImportError as error:
        assert "splitunet[dp]" in str(error), error
    else:
        raise AssertionError("epsilon computed without Opacus")
    """
    _loaded_after(code, block_optional=True)


def test_the_server_workflows_never_load_the_site_side():
    modules = _loaded_after(
        """
        from nvflare.fuel.utils.class_utils import load_class
        load_class("splitunet.flare.SplitLearningController")
        load_class("splitunet.flare.SplitInferenceController")
        """
    )
    assert "splitunet.server.trainer" in modules
    assert (
        _under(
            modules,
            "splitunet.site",
            "splitunet.flare.executor",
            "splitunet.networks.site_encoder",
            "splitunet.evaluation",
            "splitunet.tools",
        )
        == []
    )


def test_short_class_paths_fail_clearly_for_unknown_names():
    import splitunet.filters

    with pytest.raises(AttributeError, match="no attribute 'NoSuchFilter'"):
        splitunet.filters.NoSuchFilter  # noqa: B018
    assert "FeatureGuard" in dir(splitunet.filters)
