"""`convert`: swap every weight layer of a model for its feedback layer, in place."""
from __future__ import annotations

import warnings
import weakref
from typing import Iterable

from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .attention import FeedbackMultiheadAttention
from .direct import DirectFeedbackSource
from .layers import FeedbackLayer, feedback_class, from_module, refresh_ahead_of_forward
from .rules import check_scale, get_rule

# Weights that carry no error back to an input, or act elementwise: exact by design, not missed.
EXACT_BY_DESIGN = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                   nn.RMSNorm, nn.Embedding, nn.EmbeddingBag, nn.PReLU)


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in exclude)


def _converts_attention(module: nn.Module, rule_signal: str) -> bool:
    # dfa's B maps the output error to a layer's input; attention mixes positions between its
    # projections, and that map is not defined here.
    return type(module) is nn.MultiheadAttention and rule_signal == "layer"


def convert(model: nn.Module, rule: str, scale: str = "none", seed: int = 0,
            exclude: Iterable[str] = (), constrain_weight_norm: bool = False, **options) -> nn.Module:
    """Replace every weight layer of `model` (except those under a name in `exclude`) by one that
    sends the error back through feedback of the given rule, in place.

    Converted: nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.Linear, their subclasses that keep
    the base forward (parametrized layers, nn.MultiheadAttention's out_proj), lazy layers once a
    forward has materialized them, and nn.MultiheadAttention (its input projections and
    out_proj: the error reaching the attention's inputs goes through B). Normalization layers,
    embeddings, PReLU, pooling, activations and residual additions keep their exact gradients, as
    they carry no error through a weight matrix. Any other module with a weight matrix (an RNN, a
    bilinear layer, a subclass with its own forward; under dfa, attention) stays on exact backprop
    and is named in one warning; pass it in `exclude` to say that is intended.

    The new layers keep the original Parameter objects, so an optimizer built before conversion
    still trains them (Kolen-Pollack adds each layer's B as a Parameter: for rule="kp" build the
    optimizer after conversion; dfa adds hooks on `model` that read the error of its output). A
    forward pre-hook on `model` brings every layer's B up to date before each forward that records
    gradients. On the meta device the random draws wait until the tensors are materialized.
    `options` are the rule's own settings (`fa.get_rule(rule).options`; weight mirrors: lr, decay,
    batch, every, budget; sa, aa, ia: their coefficients, schedules, strength, examples): call
    `fa.after_step(model, step)` after each optimizer step (the rule's work between steps), and
    `fa.set_progress(model, fraction)` before it where an option is on a schedule. Returns `model`
    (or the new layer, if `model` itself is a weight layer).
    """
    rule_spec = get_rule(rule)
    check_scale(scale, rule_spec)
    options = rule_spec.resolve_options(options)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    named = list(model.named_modules(remove_duplicate=False))
    _check_convertible(named, exclude)
    targets = _conversion_targets(named, exclude, rule_spec.signal)
    if not targets:
        raise ValueError(f"nothing to convert: {type(model).__name__} has no convolution, linear or "
                         "attention layer" + (f" outside exclude={list(exclude)}" if exclude else ""))
    source = _direct_feedback_source(model) if rule_spec.signal == "direct" else None
    converted: dict[int, nn.Module] = {}  # a module shared at two places stays shared
    shared_warnings: set = set()
    for name, module in targets:
        layer = converted.get(id(module))
        if layer is None:
            if isinstance(module, nn.MultiheadAttention):
                layer = FeedbackMultiheadAttention.from_module(module, name, rule, scale, seed, constrain_weight_norm)
            else:
                layer = from_module(module, name, rule, scale, seed, constrain_weight_norm)
            converted[id(module)] = layer
            for feedback in _feedback_modules(layer):
                feedback._shared_warnings = shared_warnings
                feedback.rule_options = options
                if source is not None:
                    feedback.direct_source = source
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
    if rule_spec.learning == "gradient":
        _watch_optimizers_for_coupled_weight_decay()
    _warn_about_exact_modules(model, exclude)
    return model


def _check_convertible(named: list, exclude: tuple) -> None:
    """Refuse what conversion would get wrong: unknown exclude names, a converted model (its
    layers would be wrapped twice), lazy layers without shapes yet."""
    names = {name for name, _ in named}
    for prefix in exclude:
        if prefix not in names:
            raise ValueError(f"exclude names {prefix!r}, which is not a module of the model")
    for name, module in named:
        if isinstance(module, (FeedbackLayer, FeedbackMultiheadAttention)):
            used = (module if isinstance(module, FeedbackLayer) else module.out_proj).rule.name
            raise ValueError(f"model is already converted (module {name or 'model'!r} "
                             f"uses rule {used!r}); convert a fresh model")
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"module {name or 'model'!r} ({type(module).__name__}) is not materialized yet: "
                             "run one forward before fa.convert")


def _conversion_targets(named: list, exclude: tuple, signal: str) -> list:
    """(name, module) of every layer to convert, outside `exclude`; an attention module is one
    target (its projections are its own business)."""
    targets, attention_prefixes = [], []
    for name, module in named:
        if _excluded(name, exclude) or any(name.startswith(p) for p in attention_prefixes):
            continue
        if isinstance(module, nn.MultiheadAttention):
            attention_prefixes.append(f"{name}.")
            if _converts_attention(module, signal):
                targets.append((name, module))
        elif feedback_class(type(module)) is not None:
            targets.append((name, module))
    return targets


def after_step(model: nn.Module, step: int) -> None:
    """The rule's work between training steps (weight mirrors: the mirror phase), after the
    optimizer's step number `step` (counted from 1); nothing for rules without such work."""
    layers = feedback_layers(model)
    if layers:
        layer = layers[0][1]
        if layer.rule.after_step is not None:
            layer.rule.after_step(model, step, layer.rule_options)


def set_progress(model: nn.Module, fraction: float) -> None:
    """Tell the model's feedback layers how far training is (a fraction: 0 before the first step,
    step / total steps after), for rule options on a schedule over training (sa, aa, ia's
    coefficients' NAME_start and NAME_stop). The training CLI calls it before every step."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"training progress is a fraction between 0 and 1, not {fraction!r}")
    for _, layer in feedback_layers(model):
        layer.set_progress(fraction)


def _feedback_modules(layer: nn.Module) -> list[FeedbackLayer]:
    return [m for m in layer.modules() if isinstance(m, FeedbackLayer)]


def _direct_feedback_source(model: nn.Module) -> DirectFeedbackSource:
    """dfa projects the error of the class scores: their number is the out_features of the
    model's last nn.Linear (its classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"rule 'dfa' needs a classifier: {type(model).__name__} has no nn.Linear "
                         "whose outputs are the class scores")
    return DirectFeedbackSource(linears[-1].out_features)


def _warn_about_exact_modules(model: nn.Module, exclude: tuple[str, ...]) -> None:
    """One warning naming every module that owns a weight matrix and stays on exact backprop."""
    exact = []
    for name, module in model.named_modules():
        if (isinstance(module, (FeedbackLayer, FeedbackMultiheadAttention, *EXACT_BY_DESIGN))
                or _excluded(name, exclude)):
            continue
        if any("weight" in pname and p.dim() >= 2 for pname, p in module.named_parameters(recurse=False)):
            exact.append(f"{name or 'model'} ({type(module).__name__})")
    if exact:
        warnings.warn(f"fa.convert leaves {len(exact)} module(s) with weights on exact backprop: "
                      f"{', '.join(exact)}; pass them in exclude= if that is intended", UserWarning, stacklevel=3)


# -- Kolen-Pollack and the optimizer ---------------------------------------------------------
# An adaptive optimizer with coupled weight decay (Adam's weight_decay adds wd * p to the gradient
# before the per-entry scaling) gives B and W different updates, so B - W no longer decays as
# Kolen-Pollack needs. SGD (momentum included) and decoupled decay (AdamW) keep the updates equal.
_COUPLED_ADAPTIVE = ("Adam", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Adadelta")
_checked_optimizers: weakref.WeakSet = weakref.WeakSet()
_watching = False


def _watch_optimizers_for_coupled_weight_decay() -> None:
    global _watching
    if not _watching:
        register_optimizer_step_pre_hook(_check_kolen_pollack_optimizer)
        _watching = True


def _check_kolen_pollack_optimizer(optimizer, args, kwargs) -> None:
    if optimizer in _checked_optimizers:
        return
    _checked_optimizers.add(optimizer)
    if type(optimizer).__name__ not in _COUPLED_ADAPTIVE:
        return
    for group in optimizer.param_groups:
        if (group.get("weight_decay", 0) > 0 and not group.get("decoupled_weight_decay", False)
                and any(getattr(p, "_kolen_pollack_feedback", False) for p in group["params"])):
            warnings.warn(f"kp: {type(optimizer).__name__} with weight_decay={group['weight_decay']} couples the "
                          "decay into its per-entry scaling, so B and W get different updates and B - W does "
                          "not decay; use SGD or decoupled decay (AdamW)", RuntimeWarning, stacklevel=3)
            return


def feedback_layers(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
    """The converted layers of `model`, in registration order, with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FeedbackLayer)]
