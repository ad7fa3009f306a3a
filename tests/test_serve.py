"""serve.py: every route answers as inference.py does for the same files, refuses what it must, and stops without
losing requests in flight."""

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import inference
import quantize_onnx_models
import serve
from configs import AnswerOptions, ServeOptions
from serving.app import create_app
from serving.batching import MicroBatcher, QueueFull
from serving.model_service import ServedModel
from tests.conftest import ROOT
from utils.errors import UserError

pytestmark = pytest.mark.slow  # the routes need the trained tiny run

# Thresholds chosen on the tiny run's held-out predictions, so that flags and 'uncertain' both appear in answers.
DECISIONS = ("--operating_point", "malignant:sensitivity=0.9", "--abstain", "coverage=0.5")


@pytest.fixture(scope="module")
def photos(lesion_dataset, tmp_path_factory):
    """Six test photos of three classes, one wide PNG, and three files that are not usable images."""
    folder = tmp_path_factory.mktemp("serve_photos")
    test = lesion_dataset / "testset"
    for name in ("benign", "malignant", "normal"):
        for i, source in enumerate(sorted((test / name).iterdir())[:2]):
            shutil.copy(source, folder / f"{name}_{i}.jpg")
    Image.open(sorted((test / "malignant").iterdir())[2]).resize((150, 90)).save(folder / "wide.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    data = sorted((test / "benign").iterdir())[3].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return folder


def inference_answers(run_dir, folder, output, *extra, decisions=DECISIONS):
    argv = ["--model_path", str(run_dir), "--inference_folder", str(folder), "--inference_output", str(output),
            "--num_workers", "0", "--batch_size", "3", "--topk", "2", *decisions, *extra]
    inference.main(inference.parse_args(argv))
    rows = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    return {row["filename"]: row for row in rows}


def answer_options(**changes):
    values = {"topk": 2, "operating_point": DECISIONS[1], "abstain": DECISIONS[3], **changes}
    return AnswerOptions(**values)


def upload(folder, names, content_type="image/jpeg"):
    return [("files", (name, (folder / name).read_bytes(), content_type)) for name in names]


@pytest.fixture(scope="module")
def service(tiny_run):
    model = ServedModel(tiny_run, answer_options())
    with TestClient(create_app(model, ServeOptions(max_wait_ms=20, max_images_per_request=12))) as client:
        yield client, model


def assert_same_answer(served, offline):
    assert served["ok"] is True
    assert served["predicted_label"] == offline["predicted_label"]
    assert served["predicted_class"] == offline["predicted_class"]
    for name, p in offline["probabilities"].items():
        assert served["probabilities"][name] == pytest.approx(p, abs=1e-5)
    assert [t["label"] for t in served["topk"]] == [t["label"] for t in offline["topk"]]
    for key in offline:
        if key.startswith("flag_") or key == "decision":
            assert served[key] == offline[key], key


def test_predict_answers_as_inference_does_and_lists_bad_files(service, tiny_run, photos, tmp_path):
    client, _ = service
    offline = inference_answers(tiny_run, photos, tmp_path / "offline")
    names = sorted(p.name for p in photos.iterdir())
    response = client.post("/v1/predict", files=upload(photos, names))
    assert response.status_code == 200
    body = response.json()
    assert body["schema_version"] == 1 and body["run_id"] == tiny_run.name and body["model_name"]
    assert re.fullmatch(r"[0-9a-f]{12}", body["request_id"]) and response.headers["x-request-id"] == body["request_id"]
    results = {r["filename"]: r for r in body["results"]}
    assert [r["index"] for r in body["results"]] == list(range(len(names)))
    for name in names:
        if offline[name]["skipped"]:
            assert results[name]["ok"] is False and results[name]["error"], name
            continue
        assert_same_answer(results[name], offline[name])
    assert {n for n, r in results.items() if not r["ok"]} == {"empty.jpg", "notes.png", "truncated.jpg"}
    assert results["empty.jpg"]["error"] == "empty file"
    decisions = {r["decision"] for r in results.values() if r["ok"]}
    assert "uncertain" in decisions and len(decisions) > 1  # the abstention threshold really applies
    assert any("flag_malignant" in r for r in results.values() if r["ok"])


def test_explain_draws_the_overlay_inference_draws(service, tiny_run, photos, tmp_path):
    client, _ = service
    inference_answers(tiny_run, photos, tmp_path / "offline", "--generate_gradcam")
    response = client.post("/v1/explain", files=upload(photos, ["malignant_0.jpg", "notes.png"]))
    assert response.status_code == 200
    good, bad = response.json()["results"]
    assert bad["ok"] is False and "overlay_png_base64" not in bad
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(good["overlay_png_base64"]))).convert("RGB"))
    offline = np.asarray(Image.open(tmp_path / "offline" / "gradcam" / "malignant_0.jpg.gradcam.jpg").convert("RGB"))
    assert served.shape == offline.shape
    # the offline overlay is a JPEG (quality 90): the same picture differs by compression noise only
    assert np.abs(served.astype(int) - offline.astype(int)).mean() < 4


def test_model_health_and_page(service, tiny_run):
    client, model = service
    described = client.get("/v1/model").json()
    contract = json.loads((tiny_run / "class_info.json").read_text(encoding="utf-8"))
    assert described["classes"] == contract["class_names"]
    assert described["preprocessing"] == contract["preprocessing"]
    assert described["source_run"] == str(tiny_run) and described["explain"] is True
    assert described["operating_points"][0]["class"] == "malignant" and described["abstain"]["threshold"] > 0
    assert described["limits"]["max_images_per_request"] == 12
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert "피부" in html and 'capture="environment"' in html and "v1/explain" in html
    # self-contained: no script, style, font or picture from anywhere else
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "@import" not in html
    assert not re.search(r"""<(script|link)[^>]+(src|href)=(?!["']?data:)""", html)


def test_uploads_that_are_refused(service, photos):
    client, _ = service
    names = ["benign_0.jpg"] * 13
    too_many = client.post("/v1/predict", files=upload(photos, names))
    assert too_many.status_code == 413 and "--max_images_per_request" in too_many.json()["error"]
    as_json = client.post("/v1/predict", json={"image": "aGVsbG8="})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["error"]
    wrong_part = client.post("/v1/predict", files=upload(photos, ["benign_0.jpg"], "text/plain")
                             + upload(photos, ["benign_1.jpg"]))
    first, second = wrong_part.json()["results"]
    assert first["ok"] is False and "text/plain" in first["error"] and second["ok"] is True
    nothing = client.post("/v1/predict", files=[("other", ("x.txt", b"x", "text/plain"))])
    assert nothing.status_code == 422  # no 'files' part: FastAPI names the missing field


def test_body_size_limit_holds_with_and_without_content_length(tiny_run, photos):
    model = ServedModel(tiny_run, answer_options(), explain=False)
    with TestClient(create_app(model, ServeOptions(max_upload_mb=0.001))) as client:  # 1,000 bytes
        declared = client.post("/v1/predict", files=upload(photos, ["benign_0.jpg"]))
        assert declared.status_code == 413 and "--max_upload_mb" in declared.json()["error"]
        data = (photos / "benign_0.jpg").read_bytes()
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        chunked = client.post("/v1/predict", content=iter([body[i:i + 256] for i in range(0, len(body), 256)]),
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert chunked.status_code == 413
        small = (photos / "wide.png").read_bytes()
        assert len(small) > 1000  # the limit refuses this photo too; only the page and health answer
        assert client.get("/healthz").status_code == 200


def test_api_key(tiny_run, photos, tmp_path):
    key = "k" * 24
    model = ServedModel(tiny_run, answer_options(), explain=False)
    with TestClient(create_app(model, ServeOptions(), api_key=key)) as client:
        assert client.get("/v1/model").status_code == 401
        assert client.post("/v1/predict", files=upload(photos, ["benign_0.jpg"])).status_code == 401
        assert client.get("/v1/model", headers={"X-API-Key": "k" * 23 + "x"}).status_code == 401
        assert client.get("/v1/model", headers={"X-API-Key": key}).status_code == 200
        ok = client.post("/v1/predict", files=upload(photos, ["benign_0.jpg"]),
                         headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["results"][0]["ok"]
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        assert client.post("/v1/explain", files=upload(photos, ["benign_0.jpg"]),
                           headers={"X-API-Key": key}).status_code == 501  # started without Grad-CAM
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(UserError, match="at least 16 characters"):
        serve.read_api_key(str(tmp_path / "short"))
    with pytest.raises(UserError, match="not found"):
        serve.read_api_key(str(tmp_path / "missing"))
    (tmp_path / "good").write_text(key + "\n")
    assert serve.read_api_key(str(tmp_path / "good")) == key


def test_a_full_queue_answers_503_and_a_slow_answer_504(tiny_run, photos):
    model = ServedModel(tiny_run, answer_options(), explain=False)
    with TestClient(create_app(model, ServeOptions(queue_size=2))) as client:
        full = client.post("/v1/predict", files=upload(photos, ["benign_0.jpg", "benign_1.jpg", "normal_0.jpg"]))
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert client.post("/v1/predict", files=upload(photos, ["benign_0.jpg", "benign_1.jpg"])).status_code == 200
    with TestClient(create_app(model, ServeOptions(request_timeout_s=1e-6))) as client:
        slow = client.post("/v1/predict", files=upload(photos, ["benign_0.jpg"]))
        assert slow.status_code == 504 and "--request_timeout_s" in slow.json()["error"]


def test_an_export_folder_serves_its_int8_model_as_inference_does(tiny_run, photos, tmp_path, caplog):
    export = tmp_path / "export"
    quantize_onnx_models.main(quantize_onnx_models.get_args_parser().parse_args(
        ["--model_path", str(tiny_run), "--output_dir", str(export), "--calib_images", "16"]))
    offline = inference_answers(tiny_run, photos, tmp_path / "offline", "--backend", "onnx", "--onnx_model",
                                str(export / "clf_model_int8.onnx"), decisions=())
    with pytest.raises(UserError, match="--explain needs the run's PyTorch weights"):
        ServedModel(export, AnswerOptions(topk=2), explain=True)
    with pytest.raises(UserError, match="pass the run folder as --model_path"):
        ServedModel(export, answer_options())
    caplog.clear()
    model = ServedModel(export, AnswerOptions(topk=2))
    assert model.options.backend == "onnx" and model.model_file == export / "clf_model_int8.onnx"
    assert "was exported from" not in caplog.text  # the export folder's class_info.json is its run's own copy
    with TestClient(create_app(model, ServeOptions())) as client:
        assert client.get("/v1/model").json()["explain"] is False
        names = ["benign_0.jpg", "malignant_1.jpg", "wide.png"]
        for served in client.post("/v1/predict", files=upload(photos, names)).json()["results"]:
            assert_same_answer(served, offline[served["filename"]])
        assert client.post("/v1/explain", files=upload(photos, names[:1])).status_code == 501


# --- micro-batching ---------------------------------------------------------------------------------------------------
def test_concurrent_requests_share_a_forward_pass_in_order():
    calls = []

    def run_batch(items):
        calls.append(list(items))
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0.2, queue_size=64)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(4)))
        await batcher.stop()
        return answers, batcher.stats

    answers, stats = asyncio.run(scenario())
    assert answers == [[i * 10, (i + 100) * 10] for i in range(4)]
    assert len(calls) == 1 and sorted(calls[0]) == sorted([i for i in range(4)] + [i + 100 for i in range(4)])
    assert stats.batches == 1 and stats.largest_batch == 8


def test_batches_are_bounded_and_a_full_queue_refuses_whole_requests():
    sizes = []
    release = threading.Event()

    def run_batch(items):
        release.wait(5)
        sizes.append(len(items))
        return items

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch_size=3, max_wait_s=0.01, queue_size=4)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([0, 1, 2]))  # taken by the worker, which then blocks
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(batcher.submit([3, 4, 5, 6]))  # fills the queue
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit([7])
        release.set()
        results = await asyncio.gather(first, queued)
        await batcher.stop()
        return results, refused.value, batcher.stats

    results, refused, stats = asyncio.run(scenario())
    assert results == [[0, 1, 2], [3, 4, 5, 6]] and max(sizes) == 3 and refused.retry_after_s >= 1
    assert stats.refused == 1


def test_a_cancelled_request_is_not_run():
    seen = []
    gate = threading.Event()

    def run_batch(items):
        gate.wait(5)
        seen.extend(items)
        return items

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch_size=1, max_wait_s=0, queue_size=8)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(["busy"]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client timed out while waiting
        gate.set()
        await busy
        kept = await batcher.submit(["kept"])
        await batcher.stop()
        return kept

    assert asyncio.run(scenario()) == ["kept"]
    assert seen == ["busy", "kept"]


# --- the real server --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve.py exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("serve.py did not get ready")


def slow_upload(name: str, data: bytes, seconds: float):
    """A multipart body sent in pieces over ``seconds``, as from a slow phone connection: (headers, body iterator)."""
    boundary = "sl0wb0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    pieces = [body[i:i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]

    def chunks():
        for piece in pieces:
            time.sleep(seconds / len(pieces))
            yield piece

    return {"content-type": f"multipart/form-data; boundary={boundary}"}, chunks()


def test_sigterm_finishes_requests_in_flight_and_logs_no_file_names(tiny_run, photos):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "serve.py", "--model_path", str(tiny_run), "--port", str(port),
                                "--explain", "False", "--threads", "1"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(url, process)
        data = (photos / "benign_0.jpg").read_bytes()
        answers = []

        def one_request():
            # still uploading when SIGTERM comes at 0.5 s: the server must read the rest and answer
            headers, body = slow_upload("patient_kim_2024.jpg", data, seconds=1.5)
            answers.append(httpx.post(f"{url}/v1/predict", timeout=30, headers=headers, content=body))

        threads = [threading.Thread(target=one_request) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert [a.status_code for a in answers] == [200] * 6
        assert all(a.json()["results"][0]["ok"] for a in answers)
        process.wait(30)
        log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, 128 + signal.SIGTERM)
    assert "Traceback" not in log
    assert len(re.findall(r"POST /v1/predict 200 bytes_in=\d+ images=1 ok=1", log)) == 6
    assert "patient_kim" not in log  # access logs carry a request id, sizes and timings, never file names
    assert "stopped after 6 images" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=1)


def test_a_port_in_use_is_a_one_line_error(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "serve.py", "--model_path", str(tiny_run), "--port", str(port),
                               "--explain", "False"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"error: could not listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_the_load_benchmark_reports_every_level_and_memory(tiny_run, photos, tmp_path, capsys):
    from benchmarks import serve_load

    good = tmp_path / "good"
    good.mkdir()
    for photo in photos.glob("*_?.jpg"):
        shutil.copy(photo, good / photo.name)
    args = serve_load.get_args_parser().parse_args(
        ["--model_path", str(tiny_run), "--images", str(good), "--clients", "1,4", "--seconds", "1", "--warmup_s",
         "0.2", "--memory_requests", "150", "--serve_args", "--threads 1", "--output", str(tmp_path / "load.json")])
    results = serve_load.main(args)
    assert [level["clients"] for level in results["levels"]] == [1, 4]
    for level in results["levels"]:
        assert level["ok"] > 0 and level["failed_other"] == 0 and level["p95_ms"] >= level["p50_ms"] > 0
    assert results["offline"]["images"] == 6 and results["offline"]["images_per_s"] > 0
    assert results["memory"]["rss_mb_after_100"] > 50 and results["memory"]["failed_other"] == 0
    assert results["batching"]["images"] >= 150 + sum(level["ok"] for level in results["levels"])
    assert json.loads((tmp_path / "load.json").read_text())["levels"][1]["clients"] == 4
    assert "| 4 |" in capsys.readouterr().out


def test_the_dockerfile_runs_serve_with_flags_it_accepts_and_bakes_in_no_data():
    """No docker here: the image is validated instead of built. Its command must parse and pass the options schema,
    its files exist, its port and health check match the service, and data, runs and models stay out of it."""
    import shlex

    from configs import ServeConfig, from_namespace

    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    by_name = {}
    for name, rest in instructions:
        by_name.setdefault(name, []).append(rest.strip())
    assert re.fullmatch(r"python:3\.(1[0-9])-slim", by_name["FROM"][0])
    for source in (words.split()[0] for words in by_name["COPY"]):
        assert source == "." or (ROOT / source).is_file(), source
    assert by_name["USER"] == ["skinclf"]  # not root
    command = json.loads(by_name["CMD"][0])
    assert command[:2] == ["python", "serve.py"]
    args = serve.parse_args(command[2:])
    cfg = from_namespace(ServeConfig, args)
    assert cfg.serve.api_key_file and cfg.serve.host == "0.0.0.0"  # every interface, so never without a key
    assert by_name["EXPOSE"] == [str(cfg.serve.port)]
    health = shlex.split(by_name["HEALTHCHECK"][0])
    assert f"http://127.0.0.1:{cfg.serve.port}/readyz" in " ".join(health)
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".venv", "save_results", "onnx_models", "data/*_dataset", "*.pth", "*.onnx"} <= ignored
    assert not any((ROOT / pattern).is_dir() and pattern in ("dataloaders", "serving", "experiments")
                   for pattern in ignored)


def test_pixel_bombs_and_strips_are_refused_before_decoding(service, monkeypatch):
    client, _ = service
    strip, square = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (12000, 1), (120, 90, 80)).save(strip, format="PNG")  # under the pixel limit
    Image.new("RGB", (300, 300), (120, 90, 80)).save(square, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # the 300 x 300 picture now counts as a bomb
    response = client.post("/v1/predict", files=[("files", ("strip.png", strip.getvalue(), "image/png")),
                                                 ("files", ("bomb.png", square.getvalue(), "image/png"))])
    strip_answer, bomb_answer = response.json()["results"]
    assert strip_answer["ok"] is False and "longer than 20:1" in strip_answer["error"]
    assert bomb_answer["ok"] is False and "DecompressionBomb" in bomb_answer["error"]


def test_a_lone_request_does_not_wait_for_company():
    async def scenario():
        batcher = MicroBatcher(lambda items: items, max_batch_size=8, max_wait_s=2.0, queue_size=8)
        batcher.start()
        start = time.perf_counter()
        await batcher.submit(["alone"])
        alone = time.perf_counter() - start
        with batcher.expecting(1):  # another request is still decoding its photo: worth waiting for
            first = asyncio.ensure_future(batcher.submit(["first"]))
            await asyncio.sleep(0.3)
            assert not first.done()
        second = await batcher.submit(["second"])
        await first
        await batcher.stop()
        return alone, second, batcher.stats

    alone, second, stats = asyncio.run(scenario())
    assert alone < 1.0 and second == ["second"]
    assert stats.batches == 2 and stats.largest_batch == 2  # "first" waited and went with "second"


def test_stopping_lets_the_running_batch_and_the_queue_finish():
    def slow(items):
        time.sleep(0.3)
        return items

    async def scenario():
        batcher = MicroBatcher(slow, max_batch_size=1, max_wait_s=0, queue_size=8)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(["running"]))
        queued = asyncio.ensure_future(batcher.submit(["queued"]))
        await asyncio.sleep(0.05)  # "running" is on the model thread, "queued" waits
        await batcher.stop()
        # without waiting for the batch on the model thread, "queued" would never be answered
        return await asyncio.wait_for(running, 5), await asyncio.wait_for(queued, 5), batcher.running

    assert asyncio.run(scenario()) == (["running"], ["queued"], False)
