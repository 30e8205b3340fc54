# authproxy: the sidecar image, and nothing else (no demo, no test tools, no compiler).
#   docker build -t authproxy .
#   docker run -p 8000:8000 -v $PWD/my.toml:/etc/authproxy/config.toml:ro authproxy
# The default config (deploy/container.toml) listens on 0.0.0.0:8000, admin on 0.0.0.0:8001.
# A pinned base image (Python and Debian release; mirror it by digest if your registry allows),
# and every Python package at the version in constraints.txt: the image runs what CI tested.
# Every RUN below uses paths relative to WORKDIR (tests/test_deploy.py replays them outside Docker).

# Stage 1: a wheel with the request path compiled by mypyc (what `make install` builds in place).
FROM python:3.11.7-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/authproxy
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY proxy ./proxy
RUN pip install --no-cache-dir -c constraints.txt '.[otel]' mypy 'setuptools>=70.1' \
    && AUTHPROXY_MYPYC=1 pip wheel --no-cache-dir --no-build-isolation --no-deps -w wheels .

# Stage 2: the image.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    AUTHPROXY_CONFIG=/etc/authproxy/config.toml

WORKDIR /opt/authproxy
COPY constraints.txt ./
COPY --from=build /opt/authproxy/wheels ./wheels
COPY deploy/container.toml /etc/authproxy/config.toml
RUN pip install --no-cache-dir -c constraints.txt wheels/authproxy-*.whl \
    && rm -rf wheels \
    && useradd --system --uid 10001 --no-create-home authproxy

USER 10001
EXPOSE 8000 8001
# Follows admin.listen in whatever config is mounted (and its AUTHPROXY__ADMIN__LISTEN override).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["authproxy", "healthcheck"]
# The exec form: SIGTERM from `docker stop` or the kubelet reaches authproxy itself.
CMD ["authproxy", "serve"]
