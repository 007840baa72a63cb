# tensorslice server image: one file for the CPU image and the CUDA image.
#
#   docker build -t tensorslice .                                   # CPU (python:3.11-slim)
#   docker build -t tensorslice:cuda \
#       --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .   # CUDA
#   docker build --build-arg WHEELHOUSE=.wheelhouse ...             # offline: wheels only
#
# BASE needs python3 (3.10 or newer) with venv. A base that already has torch (the PyTorch
# images) keeps it: the virtual environment sees the base's packages. Otherwise torch comes
# from TORCH_INDEX (PyTorch's CPU wheels by default; a plain PyPI torch is a CUDA build of
# several GB). WHEELHOUSE, a folder of wheels inside the build context, makes the install
# offline: nothing but those wheels is used.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG WHEELHOUSE=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
# torch's C++ headers and CMake files serve only to build extensions: not kept.
RUN set -eu; \
    python3 -m venv --system-site-packages /opt/tensorslice; \
    pip="/opt/tensorslice/bin/python -m pip"; \
    if [ -n "$WHEELHOUSE" ]; then \
        $pip install --no-index --find-links "/src/$WHEELHOUSE" /src; \
    elif /opt/tensorslice/bin/python -c "import torch" 2>/dev/null; then \
        $pip install /src; \
    else \
        $pip install --extra-index-url "$TORCH_INDEX" /src; \
    fi; \
    /opt/tensorslice/bin/python -c "import tensorslice.server, tensorslice.client"; \
    rm -rf /opt/tensorslice/lib/python3*/site-packages/torch/include \
           /opt/tensorslice/lib/python3*/site-packages/torch/share/cmake

FROM ${BASE}
COPY --from=build /opt/tensorslice /opt/tensorslice
RUN set -eu; \
    (useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tensorslice 2>/dev/null \
     || adduser --system --uid 10001 --group --no-create-home tensorslice); \
    mkdir -p /data
# pip compiled the environment at install time; it is read-only at run time.
# Two malloc arenas: more keep freed memory per thread (see the README's soak).
ENV PATH=/opt/tensorslice/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# gRPC, the bulk data plane (a fixed port: clients are told it in each ticket), metrics.
EXPOSE 50051 50052 9090
# The standard gRPC health protocol; honours TENSORSLICE_TLS_CA (and friends) where the
# server speaks TLS. Health checks need no token.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
    CMD ["tensorslice", "health", "127.0.0.1:50051"]
ENTRYPOINT ["tensorslice", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--bulk-port", "50052", \
     "--metrics-port", "9090", "--dir", "/data", "--no-progress"]
