"""The ``griffin`` command line (installed as the ``griffin_cli`` package)."""
