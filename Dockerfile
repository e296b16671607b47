# One image for every AetherOps service; docker-compose.yml picks the service with AETHEROPS_SERVICES.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY gen ./gen
COPY aetherops ./aetherops
COPY servers ./servers
COPY clients ./clients
RUN pip install --no-cache-dir .
RUN useradd --system aetherops
USER aetherops
EXPOSE 50051
ENTRYPOINT ["aetherops", "serve"]
