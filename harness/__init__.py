"""harness: train, attack and report adversarial-training defenses under one protocol."""

__version__ = "0.1.0"
