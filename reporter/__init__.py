"""anylearn-reporter: the in-container training reporter for the AnyLearn platform.

Training code calls :func:`report_metric` (or AnyLearn's :func:`report_intermediate_metric` and
:func:`report_final_metric`); every report is journalled on disk at once and delivered to the backend
in the background, with retries. Importing this package is cheap: no network, and the HTTP stack is
loaded by the delivery thread only.
"""

from .api import (
    flush,
    report_final_metric,
    report_intermediate_metric,
    report_metric,
    report_metrics,
)
from .config import ConfigError
from .integrations.autolog import autolog

__version__ = "0.1.0"

__all__ = [
    "report_metric",
    "report_intermediate_metric",
    "report_final_metric",
    "report_metrics",
    "flush",
    "ConfigError",
    "autolog",
    "__version__",
]
