"""The version of sa_cuda: the one place it is written (pyproject.toml reads it, sa_cuda re-exports it)."""

__version__ = "0.1.0"
