# The project image: one image for the pipeline's components, the training workers (PyTorchJob /
# TrainJob pods) and the KServe predictor. Dependencies come pinned from requirements.lock; the final
# stage holds the Python runtime and the virtual environment only (no compilers, no pip caches, no
# sources beyond the installed package) and runs as a non-root user.
#   docker build -t ghcr.io/flywheel-ml/flywheel:0.1.0 .   (the tag is the settings' `image`)
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (their layer survives code changes): the runtime dependencies of the package,
# each at the version the lock pins (the lock also pins the test tools, which stay out).
COPY requirements.lock pyproject.toml README.md ./
COPY flywheel ./flywheel
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip install --constraint requirements.lock . \
    && pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="flywheel" \
      org.opencontainers.image.description="flywheel's components, training workers and KServe predictor"
RUN groupadd --system --gid 10001 flywheel \
    && useradd --system --uid 10001 --gid flywheel --create-home --home-dir /home/flywheel flywheel
COPY --from=build /opt/venv /opt/venv
COPY feature_repo /opt/flywheel/feature_repo
# The repository's use cases, until a step can fetch its use case's folder from storage (issue 19):
# the default one is the settings' default, found from the working directory.
COPY usecases /home/flywheel/usecases
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLYWHEEL_HOME=/home/flywheel/.flywheel
USER 10001:10001
WORKDIR /home/flywheel
EXPOSE 8080 8081
# KFP and KServe set their own commands (python3 -m kfp.dsl.executor_main, python -m serving).
CMD ["flywheel", "--help"]
