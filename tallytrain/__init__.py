"""tallytrain: hard-label federated distillation with packed votes."""
__version__ = "0.1.0"
