"""torchax-bridge: PyTorch model definitions that run on JAX.

Import nothing heavy here: the CLI must parse ``--devices`` before jax starts its backend.
"""

__version__ = "0.1.0"
