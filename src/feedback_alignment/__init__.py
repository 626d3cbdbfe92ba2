"""feedback_alignment: deep learning without weight transport, in PyTorch.

    import feedback_alignment as fa
    model = fa.convert(model, rule="frsf", scale="match", seed=0)
    ... after each optimizer step: fa.after_step(model, step)   (the rule's between-step work, if any)
    ... with a rule option on a schedule (sa/aa/ia's NAME_start, NAME_stop), before each step:
        fa.set_progress(model, step / total_steps)
"""
from . import alignment, mirror, optim
from .convert import after_step, convert, feedback_layers, set_progress
from .attention import FeedbackMultiheadAttention
from .layers import (FeedbackConv1d, FeedbackConv2d, FeedbackConv3d, FeedbackConvTranspose1d,
                     FeedbackConvTranspose2d, FeedbackConvTranspose3d, FeedbackLayer, FeedbackLinear)
from .rules import RULES, SCALES, get_rule

__all__ = ["after_step", "alignment", "mirror", "RULES", "SCALES", "convert", "feedback_layers", "get_rule", "optim",
           "set_progress",
           "FeedbackConv1d", "FeedbackConv2d", "FeedbackConv3d", "FeedbackConvTranspose1d",
           "FeedbackConvTranspose2d", "FeedbackConvTranspose3d", "FeedbackLayer", "FeedbackLinear",
           "FeedbackMultiheadAttention"]
__version__ = "0.1.0"
