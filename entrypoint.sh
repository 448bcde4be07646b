#!/bin/sh
# The container's ENTRYPOINT: become `anylearn-reporter run`, so the wrapper replaces PID 1's shell and
# receives the container's signals itself. Arguments pass through: `docker run IMAGE -- python train.py`.
set -eu
exec anylearn-reporter run "$@"
