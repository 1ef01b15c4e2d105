"""mallgate: the third-party gateway of an online mall."""

__version__ = "0.1.0"
