"""The ``xenlab`` command: one module per command group, thin, no logic."""
