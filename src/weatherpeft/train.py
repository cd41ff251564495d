"""The former home of the Trainer, kept so that ``from weatherpeft.train import …`` works:
every name here is :mod:`weatherpeft.training`'s."""

from weatherpeft.training import *  # noqa: F403
from weatherpeft.training import __all__  # noqa: F401
