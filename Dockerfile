# The tuning service on the official Ray GPU image of the Ray version we pin (pyproject.toml).
#   docker build -t bert4rec-tuner:0.1.0 .
#   docker run --gpus all bert4rec-tuner:0.1.0 tuner tune --dry-run
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

# the base image runs as the non-root user `ray` (uid 1000); keep it that way
USER 1000:100
WORKDIR /home/ray/app

# torch for the image's CUDA 12 runtime, then the locked dependencies (torch excluded from the lock:
# its wheel depends on the platform), then the package itself without touching them
RUN pip install --no-cache-dir torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128
COPY --chown=1000:100 requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 tuner ./tuner
COPY --chown=1000:100 search_spaces ./search_spaces
COPY --chown=1000:100 cluster ./cluster
RUN pip install --no-cache-dir --no-deps .

ENV RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
CMD ["tuner", "--help"]
