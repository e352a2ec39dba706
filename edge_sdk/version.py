"""The package version (one place: the facade, the CLI and the bundle manifest read it)."""

__version__ = "0.1.0"
