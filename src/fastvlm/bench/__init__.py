"""``fastvlm bench``: our model, through each entry point, against transformers.

``cli`` has the command (``add_arguments``, ``run``); ``sides`` builds what is measured.
The reference needs the ``bench`` extra (transformers, timm, torchvision).
"""

from .cli import add_arguments, main, run
from .sides import SIZES

__all__ = ["SIZES", "add_arguments", "main", "run"]
