"""The package version, at the bottom so that any module can write it into a file it saves."""
__version__ = "0.1.0"
