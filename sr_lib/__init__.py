"""srspace: learn, sample and evaluate the super-resolution space."""

__version__ = "0.2.0"
