# authproxy: the sidecar image, and nothing else (no demo, no test tools).
#   docker build -t authproxy .
#   docker run -p 8000:8000 -v $PWD/my.toml:/etc/authproxy/config.toml:ro authproxy
# The default config (deploy/container.toml) listens on 0.0.0.0:8000, admin on 0.0.0.0:8001.
# A pinned base image (Python and Debian release; mirror it by digest if your registry allows),
# and every Python package at the version in constraints.txt: the image runs what CI tested.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    AUTHPROXY_CONFIG=/etc/authproxy/config.toml

WORKDIR /opt/authproxy
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy
COPY deploy/container.toml /etc/authproxy/config.toml
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 --no-create-home authproxy

USER 10001
EXPOSE 8000 8001
# Follows admin.listen in whatever config is mounted (and its AUTHPROXY__ADMIN__LISTEN override).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["authproxy", "healthcheck"]
# The exec form: SIGTERM from `docker stop` or the kubelet reaches authproxy itself.
CMD ["authproxy", "serve"]
