"""srspace: learn, sample and evaluate the super-resolution space."""

__version__ = "0.1.0"
