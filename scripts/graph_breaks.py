"""torch.compile's graphs and graph breaks for a training step's forward and loss, per rule, on
CIFAR ResNet-20 (after one eager step, in which dfa draws its B):

    python scripts/graph_breaks.py bp fa usf brsf frsf dfa kp wm
"""
import sys

import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

import feedback_alignment as fa
from feedback_alignment.models import build_model

for rule in sys.argv[1:] or fa.RULES:
    torch.manual_seed(0)
    scale = "match" if fa.get_rule(rule).scalable else "none"
    model = fa.convert(build_model("resnet20", 10, 3, 32), rule=rule, scale=scale, seed=0)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(model(images), labels).backward()
    dynamo.reset()
    explanation = dynamo.explain(lambda x, y: F.cross_entropy(model(x), y))(images, labels)
    print(f"{rule}: {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)")
    for reason in explanation.break_reasons[:1]:
        print("  first break:", str(reason.reason).splitlines()[0][:200])
