# An image for non-standard AnyLearn algorithms: the wrapper is the ENTRYPOINT and runs the task's
# ANYLEARN_ENTRYPOINT (or the command given after --) with its hyper-parameters.
#   docker build -t anylearn-reporter:0.1.0 .
#   docker run -v "$PWD/anylearn-runs:/workspace/anylearn-runs" -e ANYLEARN_ENTRYPOINT="python examples/train.py" anylearn-reporter:0.1.0
# The volume keeps the run directories (the journal a later `anylearn-reporter sync` delivers) after the
# container is gone; the host directory must be writable by uid 1000 (the image's user).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ANYLEARN_REPORTER_DIR=/workspace/anylearn-runs

WORKDIR /opt/anylearn-reporter
COPY pyproject.toml setup.cfg README.md ./
COPY reporter ./reporter
RUN pip install . && rm -rf /opt/anylearn-reporter  # the installed package is in site-packages; no build/ or egg-info left

COPY entrypoint.sh /entrypoint.sh
COPY examples /workspace/examples
RUN chmod 0755 /entrypoint.sh \
    && useradd --create-home --uid 1000 trainer \
    && chown -R trainer:trainer /workspace

USER trainer
WORKDIR /workspace
ENTRYPOINT ["/entrypoint.sh"]
