"""ssl-eval: honest, reproducible evaluation of vision representations."""

__version__ = "0.1.0"
