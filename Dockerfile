# cdcd daemon image: `cdcd run --config /etc/cdcd/cdcd.yaml` (mount the file, see docker-compose.yml).
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cdcd ./cdcd
RUN pip install --no-cache-dir ".[postgres,kafka,kafka-fast]" && rm -rf /src

USER nobody
EXPOSE 9108
ENTRYPOINT ["cdcd"]
CMD ["run", "--config", "/etc/cdcd/cdcd.yaml"]
