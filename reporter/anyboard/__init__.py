"""Anyboard: every named metric of a task in the platform's curves store (Apache IoTDB).

A second destination of the run's journal. :mod:`.config` reads the platform's variables, :mod:`.points`
turns journal entries into IoTDB points (name cleaning, device path, the point's time), and
:mod:`.writer` writes them in typed batches over the IoTDB client's generated Thrift service. Only the
writer needs the optional extra (``pip install 'anylearn-reporter[anyboard]'``); ``import reporter`` never
imports this package.
"""

from .config import AnyboardConfig, anyboard_config
from .points import Point, clean_metric_name, device_path, point_time, series_name, to_points

__all__ = [
    "AnyboardConfig", "anyboard_config",
    "Point", "clean_metric_name", "device_path", "point_time", "series_name", "to_points",
]
