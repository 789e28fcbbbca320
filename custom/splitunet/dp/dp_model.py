"""The model as DP-SGD trains it: what Opacus cannot take is found before training, changed, and recorded.

On the bundle's U-Net (MONAI's BasicUNet blocks) Opacus 1.6 needs one change, and the weights stay exchangeable
with a model trained without DP (the same state dict, the same function):

- **In-place activations** (``LeakyReLU(inplace=True)`` after every instance norm) are made out-of-place: Opacus'
  per-sample gradient hooks wrap module outputs, and autograd forbids modifying such an output in place
  (``RuntimeError: Output 0 of BackwardHookFunction is a view and is being modified inplace``). The output is the
  same, computed into a new tensor.
- **Instance norm stays.** ``InstanceNorm3d`` with affine parameters and without running statistics (MONAI's
  ``("instance", {"affine": True})``) normalises each sample by its own statistics, so it needs no privacy
  mechanism of its own; Opacus' ``ModuleValidator`` accepts it and has a per-sample gradient for it. BatchNorm, which
  mixes the samples of a batch, would be replaced by GroupNorm by ``ModuleValidator.fix``; the U-Net has none.
- **Transposed convolutions** (the decoder's up-sampling) have no Opacus grad sampler of their own; Opacus computes
  their per-sample gradients with ``torch.func`` (its functorch fallback), exactly, at some cost in time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from splitunet.errors import SplitUNetConfigError

__all__ = ["DPModelChanges", "prepare_for_dp"]


@dataclass
class DPModelChanges:
    """What :func:`prepare_for_dp` changed in a model, by module name.

    Attributes:
        replaced: ``"name: OldType -> NewType"`` for each module ``ModuleValidator.fix`` replaced.
        made_out_of_place: modules whose ``inplace`` flag was switched off.
        functorch: modules with trainable parameters that Opacus has no grad sampler for (``torch.func`` instead).
    """

    replaced: list[str] = field(default_factory=list)
    made_out_of_place: list[str] = field(default_factory=list)
    functorch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log: counts and types, not every module's name."""
        parts = [
            f"{len(self.replaced)} module(s) replaced" + (f" ({'; '.join(self.replaced)})" if self.replaced else "")
        ]
        parts.append(f"{len(self.made_out_of_place)} in-place activation(s) made out-of-place")
        parts.append(
            f"{len(self.functorch)} module(s) without an Opacus grad sampler, per-sample gradients by torch.func"
        )
        return ", ".join(parts)

    def as_dict(self) -> dict:
        """JSON-serializable record."""
        return {
            "replaced": list(self.replaced),
            "made_out_of_place": len(self.made_out_of_place),
            "functorch": len(self.functorch),
        }


def prepare_for_dp(model: nn.Module) -> tuple[nn.Module, DPModelChanges]:
    """Make ``model`` trainable by Opacus' DP-SGD, and say what changed.

    Modules Opacus' ``ModuleValidator`` refuses are replaced by ``ModuleValidator.fix`` (the result is a copy, whose
    state dict may differ: BatchNorm's running statistics go); otherwise the model is changed in place (in-place
    flags only) and returned as it was, so an optimiser built on its parameters still fits.

    Raises:
        SplitUNetConfigError: a module that Opacus can neither take nor fix (the message names it).
    """
    changes = DPModelChanges()
    if ModuleValidator.validate(model, strict=False):
        before = {name: type(module).__name__ for name, module in model.named_modules()}
        model = ModuleValidator.fix(model)
        changes.replaced = [
            f"{name}: {before[name]} -> {type(module).__name__}"
            for name, module in model.named_modules()
            if name in before and before[name] != type(module).__name__
        ]
        remaining = ModuleValidator.validate(model, strict=False)
        if remaining:
            raise SplitUNetConfigError(
                "the model has layers DP-SGD cannot train, even after Opacus' fixes: "
                + "; ".join(str(error) for error in remaining)
            )
    for name, module in model.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changes.made_out_of_place.append(name)
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            changes.functorch.append(name)
    return model, changes
