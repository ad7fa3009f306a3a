# The skinclf service on CPU: serve.py with the run folder or export folder mounted at /models.
#   docker build -t skinclf-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/onnx_models:/models:ro" \
#     -v "$PWD/api_key.txt:/run/secrets/skinclf_api_key:ro" skinclf-serve
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
WORKDIR /app

# Requirements first, so a code change does not reinstall them; PyTorch's CPU wheels keep the image small.
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY . .
RUN useradd --create-home --uid 10001 skinclf
USER skinclf

EXPOSE 8000
# uvicorn finishes the requests in flight on SIGTERM (docker stop), within --graceful_timeout_s
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
# Inside a container the service must listen on every interface, so the API key is required.
CMD ["python", "serve.py", "--model_path", "/models", "--host", "0.0.0.0", "--port", "8000", \
     "--api_key_file", "/run/secrets/skinclf_api_key"]
