"""Holds the ``sitecustomize`` that ``anylearn-reporter run --autolog`` puts first on the command's
``PYTHONPATH`` (this directory, not the package, goes on the path)."""
