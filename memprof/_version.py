"""memprof's version, in a module that imports nothing (the package face and the submodules read it here)."""

__version__ = "0.1.0"
