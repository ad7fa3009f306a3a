"""Serve a trained run (or its ONNX/INT8 export) over HTTP: a JSON API and a one-page app for clinicians.

Example:
    python serve.py --model_path latest
    python serve.py --model_path onnx_models --port 8080

Routes: POST /v1/predict and /v1/explain (multipart images), GET /v1/model, /healthz, /readyz, /openapi.json, and
GET / (the page). Answers equal inference.py's for the same files: the run's preprocessing, TTA, temperature,
operating points and abstention.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import Optional

from configs import ServeConfig, add_dataclass_arguments, from_namespace, parse_with_config_file
from utils.cli import run_cli
from utils.errors import UserError
from utils.logging_setup import setup_logging

logger = logging.getLogger("serve")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("skinclf serve", add_help=add_help,
                                     description="Serve a run folder or an export folder over HTTP (JSON API and a "
                                                 "page for clinicians).")
    add_dataclass_arguments(parser, ServeConfig)
    return parser


def read_api_key(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    key_file = Path(path)
    if not key_file.is_file():
        raise UserError(f"--api_key_file {key_file} not found; write the key on one line in that file")
    key = key_file.read_text(encoding="utf-8", errors="strict").strip()
    if len(key) < 16 or any(c.isspace() for c in key):
        raise UserError(f"--api_key_file {key_file}: the key must be one line of at least 16 characters without "
                        f"spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return key


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(args: argparse.Namespace) -> None:
    setup_logging()
    cfg = from_namespace(ServeConfig, args)
    api_key = read_api_key(cfg.serve.api_key_file)
    if not _loopback(cfg.serve.host) and api_key is None:
        logger.warning("!!! listening on %s without --api_key_file: anyone who reaches this machine can send photos",
                       cfg.serve.host)

    import uvicorn

    from serving.app import create_app
    from serving.model_service import ServedModel

    model = ServedModel(cfg.model_path, cfg.answer, cfg.serve.explain, cfg.serve.threads)
    app = create_app(model, cfg.serve, api_key)
    host = f"[{cfg.serve.host}]" if ":" in cfg.serve.host else cfg.serve.host
    logger.info("page: http://%s:%d/  API: /v1/predict, /v1/explain, /v1/model (schema: /openapi.json)", host,
                cfg.serve.port)
    config = uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=cfg.serve.graceful_timeout_s, server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits with 3 when it cannot bind; said in one line below
        if server.started:
            raise
    if not server.started:
        raise UserError(f"could not listen on {cfg.serve.host}:{cfg.serve.port} (see the error above); pick another "
                        f"--port or stop the program using it")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return parse_with_config_file(get_args_parser(), argv)


if __name__ == "__main__":
    run_cli(main, parse_args)
