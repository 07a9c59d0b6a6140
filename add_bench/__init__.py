"""add-bench: a reference suite for Adversarial Diffusion Distillation (Sauer et al. 2023)."""

__version__ = "0.1.0"
