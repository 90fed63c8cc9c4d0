"""The ``icbd-cache`` commands, one module per family."""
