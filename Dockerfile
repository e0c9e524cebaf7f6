# One image for every node of an augpipe Ray cluster: the head, the GPU workers and the job submitter.
# Ray requires the same Python and Ray versions on every node and client; one image guarantees it.
FROM python:3.11-slim

# wget: the exec health probes of KubeRay releases before HTTP probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc wget \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The build context is filtered by .dockerignore: no .venv, corpora, model folders or caches.
COPY . /app
# torch comes from PyPI here, i.e. its CUDA build: the GPU workers use it, CPU-only nodes run it on CPU.
RUN make .venv/.runtime PYTHON=python3

# XDG_CACHE_HOME puts the Hugging Face cache (/models/huggingface) and Whisper checkpoints
# (/models/whisper) on the model-cache volume, filled once by deploy/fetch_models.py; runs never download.
ENV PATH=/app/.venv/bin:$PATH \
    XDG_CACHE_HOME=/models \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
# Login shells (`bash -l`, which older KubeRay releases use to start Ray) reset PATH from /etc/profile.
RUN echo 'export PATH=/app/.venv/bin:$PATH' > /etc/profile.d/augpipe.sh
