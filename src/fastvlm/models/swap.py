"""Replace a model's linear layers in place, one at a time."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> None:
    """Replace every ``nn.Linear`` under ``root`` by ``make(linear)``; None keeps it.

    Only the parents are listed up front, never the linears themselves: each replaced
    layer is then freed as soon as it is swapped, instead of every original weight
    staying alive next to its replacement until the end.
    """
    parents = [m for m in root.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
    for module in parents:
        names = [name for name, child in module.named_children() if isinstance(child, nn.Linear)]
        for name in names:
            if (new := make(getattr(module, name))) is not None:
                setattr(module, name, new)
