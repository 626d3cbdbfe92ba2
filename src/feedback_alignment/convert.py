"""`convert`: swap every nn.Conv2d and nn.Linear of a model for its feedback layer, in place."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from .direct import DirectFeedbackSource
from .layers import FeedbackLayer, from_module, refresh_ahead_of_forward
from .rules import check_scale, get_rule

CONVERTIBLE = (nn.Conv2d, nn.Linear)


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in exclude)


def convert(model: nn.Module, rule: str, scale: str = "none", seed: int = 0,
            exclude: Iterable[str] = (), constrain_weight_norm: bool = False) -> nn.Module:
    """Replace every nn.Conv2d / nn.Linear in `model` (except those under a name in `exclude`)
    by a layer that sends the error back through feedback of the given rule.

    The new layers keep the original Parameter objects, so an optimizer built before conversion
    still trains them. (Kolen-Pollack adds each layer's B as a Parameter: for rule="kp" build the
    optimizer after conversion. dfa adds hooks on `model` that read the error of its output.)
    A forward pre-hook on `model` brings every layer's B up to date before each training forward;
    a layer called on its own does it in its own forward.
    Returns `model` (or the new layer, if `model` itself is a Conv2d/Linear).
    Only exact nn.Conv2d / nn.Linear are converted: a subclass may compute its forward differently.
    """
    rule_spec = get_rule(rule)
    check_scale(scale, rule_spec)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    named = list(model.named_modules(remove_duplicate=False))
    names = {name for name, _ in named}
    for prefix in exclude:
        if prefix not in names:
            raise ValueError(f"exclude names {prefix!r}, which is not a module of the model")
    for name, module in named:
        if isinstance(module, FeedbackLayer):
            raise ValueError(f"model is already converted (module {name or 'model'!r} "
                             f"uses rule {module.rule.name!r}); convert a fresh model")

    converted: dict[int, FeedbackLayer] = {}  # a module shared at two places stays shared
    targets = [(name, module) for name, module in named
               if type(module) in CONVERTIBLE and not _excluded(name, exclude)]
    if not targets:
        raise ValueError(f"nothing to convert: {type(model).__name__} has no nn.Conv2d or nn.Linear"
                         + (f" outside exclude={list(exclude)}" if exclude else ""))
    source = _direct_feedback_source(model) if rule_spec.signal == "direct" else None
    for name, module in targets:
        layer = converted.get(id(module))
        if layer is None:
            layer = converted[id(module)] = from_module(module, name, rule, scale, seed,
                                                        constrain_weight_norm)
            if source is not None:
                layer.direct_source = source
        if name == "":
            model = layer
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
    if source is not None:
        # The model's own output is where dfa reads the error; the hooks live on the model.
        model.register_forward_pre_hook(source.begin)
        model.register_forward_hook(source.attach)
    if not isinstance(model, FeedbackLayer):
        model.register_forward_pre_hook(refresh_ahead_of_forward)
    return model


def _direct_feedback_source(model: nn.Module) -> DirectFeedbackSource:
    """dfa projects the error of the class scores: their number is the out_features of the
    model's last nn.Linear (its classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"rule 'dfa' needs a classifier: {type(model).__name__} has no nn.Linear "
                         "whose outputs are the class scores")
    return DirectFeedbackSource(linears[-1].out_features)


def feedback_layers(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
    """The converted layers of `model`, in registration order, with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FeedbackLayer)]
