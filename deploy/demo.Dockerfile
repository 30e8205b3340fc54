# The demo backend and its page (upstream_demo), for docker-compose.yml only: never deploy it, its
# identity provider has hard-coded users.
FROM python:3.11.7-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/authproxy
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy
COPY upstream_demo ./upstream_demo
RUN pip install --no-cache-dir -c constraints.txt '.[demo]' \
    && useradd --system --uid 10001 --no-create-home demo
USER 10001
EXPOSE 9000 5173
CMD ["python", "-m", "upstream_demo", "--host", "0.0.0.0", "--port", "9000", "--web-port", "5173", \
     "--issuer", "http://demo:9000", "--api-url", "http://localhost:8000", \
     "--ws-url", "ws://localhost:8000/ws"]
