"""The package version, in one place (setup.py and saved files read it)."""
__version__ = "0.1.0"
