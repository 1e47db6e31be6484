"""A Django Channels layer that relays groups between processes over a pluggable backplane."""

__version__ = "0.1.0"
