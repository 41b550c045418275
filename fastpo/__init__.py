"""fastpo: fast, memory-lean preference optimization.

Importing fastpo imports torch only; Triton, transformers and datasets load on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "token_logprobs": "fastpo.ops",
    "token_stats": "fastpo.ops",
    "TokenStats": "fastpo.ops",
    "score": "fastpo.attention",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastpo' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
