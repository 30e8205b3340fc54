# authproxy: the sidecar image. Mount your config at /etc/authproxy/config.toml; in it, listen on
# 0.0.0.0:8000 (public) and keep the admin listener where the health check reaches it (:8001).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    AUTHPROXY_CONFIG=/etc/authproxy/config.toml

WORKDIR /opt/authproxy
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 --no-create-home authproxy

USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/healthz', timeout=2)"]
CMD ["authproxy", "serve"]
