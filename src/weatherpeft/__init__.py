"""weatherpeft: parameter-efficient fine-tuning of weather foundation models.

The public API for your own training loop and for serving adapters (imported on first use, so
``import weatherpeft`` stays light): :func:`adapt`, :func:`load_adapter`, :class:`AdaptedModel`,
:class:`MultiAdapterModel`, :class:`AdapterError`.
"""

__version__ = "0.1.0"

_API = {"adapt": "weatherpeft.api", "load_adapter": "weatherpeft.api",
        "AdaptedModel": "weatherpeft.api", "AdapterError": "weatherpeft.adapters",
        "MultiAdapterModel": "weatherpeft.serving"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'weatherpeft' has no attribute {name!r}")
