"""Every source of backbone names, one module per family: built-in baselines and timm
(``builtin``), the checkpoint families (``supervised``, ``cifar``, ``simclr``, ``mocov3``,
``mae``, ``dino``, ``dinov2``, ``dinov3``) and ``ssl-eval train`` folders (``trained``).

Each module registers its family, tags, prefixes or folder reader on import. Nothing lists
them: ``catalog.py`` imports every module found here, so a new file is all a new family needs.
"""
