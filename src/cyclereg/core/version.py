"""The version of cyclereg, written into model files and printed by ``cyclereg --version``."""

__version__ = "0.1.0"
