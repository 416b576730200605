# GPU image for the same pipeline. The torch/torchvision pins in requirements.lock
# are CUDA builds that bring their own CUDA libraries; the base image supplies
# the driver-facing runtime. Build: docker build -t fbta . ; run with --gpus all.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HUB_OFFLINE=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv git make ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 fbta
WORKDIR /home/fbta/app
COPY --chown=fbta:fbta requirements.lock pyproject.toml README.md ./
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install pip==26.3 \
 && /opt/venv/bin/pip install -r requirements.lock
COPY --chown=fbta:fbta . .
RUN /opt/venv/bin/pip install --no-deps -e . && chown -R fbta:fbta /home/fbta/app
ENV PATH=/opt/venv/bin:$PATH
USER fbta

ENTRYPOINT ["fbta"]
CMD ["--help"]
