"""``anylearn-reporter ui``: a local page of every curve of the run directories (see :mod:`.server`)."""
