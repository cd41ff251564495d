"""weatherpeft: parameter-efficient fine-tuning of weather foundation models."""

__version__ = "0.1.0"
