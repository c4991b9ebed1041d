"""Training stages on top of transformers/TRL trainers; shared run-directory steps in ``common``."""
