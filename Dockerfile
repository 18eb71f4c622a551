# Tollgate: a slim image running `python main.py`.
#   docker build -t tollgate .
#   docker run -p 8000:8000 -v "$PWD/config:/config" -v tollgate-data:/data tollgate
# /config must hold api.yaml (start from api.yaml.example); /data keeps the SQLite ledger.
# For a fleet set TOLLGATE_DATABASE=postgresql://… (and TOLLGATE_WORKERS): docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOLLGATE_CONFIG=/config/api.yaml \
    TOLLGATE_DB=/data/tollgate.db \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app
COPY requirements.txt requirements-otel.txt ./
RUN pip install --no-cache-dir -r requirements.txt
# OpenTelemetry traces are an add-on: docker build --build-arg WITH_OTEL=1 -t tollgate .
ARG WITH_OTEL=0
RUN if [ "$WITH_OTEL" = "1" ]; then pip install --no-cache-dir -r requirements-otel.txt; fi

COPY main.py api.yaml.example ./
COPY core ./core
COPY routes ./routes
COPY web ./web

RUN useradd --system --uid 10001 --home-dir /app tollgate \
    && mkdir -p /config /data \
    && chown tollgate /config /data
USER tollgate
VOLUME ["/config", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=3)"
CMD ["python", "main.py"]
