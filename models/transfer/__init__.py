"""Expression transfer: (ψ, jaw) of a driver + the target's neutral mesh -> the target's Δf;
head-pose retargeting; parametric edits. nn.Modules and math only."""
from .flavors import FLAVORS, TransferFlavor, flavor
from .module import ExpressionTransfer

__all__ = ["FLAVORS", "ExpressionTransfer", "TransferFlavor", "flavor"]
