"""Fine-tuning FastVLM: LoRA or full, on LLaVA-style or chat data, single process or torchrun.

``recipe.finetune`` runs the whole recipe; ``adapter`` reads, writes and merges LoRA
adapters in PEFT's format (no ``peft`` needed to use one); ``export`` writes full
checkpoints in the base's own format. The ``fastvlm finetune`` and ``fastvlm merge``
commands live in ``cli`` and ``merge``.
"""
