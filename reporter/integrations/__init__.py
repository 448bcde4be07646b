"""Framework integrations: callbacks that turn a trainer's logs into reports, and :func:`autolog`.

Each ``reporter.integrations.<framework>`` module imports its framework when it is imported itself;
this package imports none (``import reporter`` stays light). The rule that picks the objective and the
final metric lives once, in :mod:`reporter.integrations._objective`.
"""
