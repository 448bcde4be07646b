#!/bin/sh
# The container's ENTRYPOINT: become `anylearn-reporter run`, so the wrapper replaces PID 1's shell and
# receives the container's signals itself. As PID 1 the wrapper also reaps every orphan of the container
# (no tini needed) and stops what the command leaves running. Arguments pass through:
# `docker run IMAGE -- python train.py`.
set -eu
exec anylearn-reporter run "$@"
