"""`vitlab serve` through FastAPI's test client: answers equal `vitlab predict`'s, refusals are 4xx JSON, the
batcher hands each concurrent request its own answer, and (on a real uvicorn) a stalled upload blocks no one."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import io
import json
import logging
import socket
import struct
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_VIT, count, one_error_line, random_model
from vitlab.cli import main
from vitlab.models.registry import config_to_dict
from vitlab.precision import resolve_amp
from vitlab.weights.files import write_safetensors
from vitlab.weights.io import CONFIG_METADATA_KEY

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("multipart", reason="the serve extra (python-multipart) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from vitlab.analysis.attention import attention_maps, attention_rollout  # noqa: E402
from vitlab.data import EvalTransform  # noqa: E402
from vitlab.serve.app import ServeConfig, create_app, pixel_threads  # noqa: E402
from vitlab.serve.batching import Batcher  # noqa: E402
from vitlab.serve.model import ServedModel, serving_precision  # noqa: E402

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def save_with_classes(model: torch.nn.Module, path: Path, classes: list[str]) -> Path:
    """A vitlab weights file that records its class names, as training's checkpoints do."""
    write_safetensors(path, model.state_dict(), {CONFIG_METADATA_KEY: json.dumps(config_to_dict(model.config)),
                                                 "classes": json.dumps(classes)})
    return path


AUTO = "bf16" if resolve_amp("auto", torch.device("cpu")) else "fp32"

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_classes(random_model(TINY_VIT), tmp_path_factory.mktemp("serve") / "tiny.safetensors", CLASSES)


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> ServedModel:
    """Served as `predict` runs by default: under the precision `amp=auto` picks on this machine (`AUTO`)."""
    return ServedModel(str(checkpoint))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Different sizes, modes and formats, each decoded by the same code path as `vitlab predict`'s."""
    folder, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    paths = []
    for index, (mode, shape, suffix) in enumerate([("RGB", (40, 30, 3), "png"), ("L", (17, 23), "png"),
                                                   ("RGBA", (33, 33, 4), "png"), ("RGB", (64, 48, 3), "jpg"),
                                                   ("RGB", (20, 50, 3), "webp"), ("RGB", (32, 32, 3), "bmp"),
                                                   ("RGB", (36, 30, 3), "gif"), ("RGB", (31, 45, 3), "tiff")]):
        path = folder / f"{index}.{suffix}"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
        paths.append(path)
    return paths


def client_for(served: ServedModel, **options: object) -> TestClient:
    return TestClient(create_app(ServeConfig(str(served.card["checkpoint"]), **options), served))


def post(client: TestClient, path: Path, query: str = "", raw: bool = False) -> dict:
    data = path.read_bytes()
    response = (client.post(f"/v1/predict{query}", content=data, headers={"content-type": "image/png"}) if raw
                else client.post(f"/v1/predict{query}", files={"file": (path.name, data)}))
    assert response.status_code == 200, response.text
    return response.json()


def test_answers_equal_vitlab_predict(checkpoint: Path, served: ServedModel, images: list[Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(checkpoint), *map(str, images), "--json", "--top-k", "5"]) == 0
    expected = [json.loads(line)["top"] for line in capsys.readouterr().out.strip().splitlines()]
    with client_for(served, max_batch=1) as client:
        for path, reference in zip(images, expected, strict=True):
            for raw in (False, True):
                answer = post(client, path, "?top_k=5", raw=raw)
                assert [item["label"] for item in answer["top"]] == [item["class"] for item in reference]
                np.testing.assert_allclose([item["probability"] for item in answer["top"]],
                                           [item["prob"] for item in reference], rtol=0, atol=1e-5)
                assert answer["precision"] == AUTO and answer["image"]["format"] == Image.open(path).format
        assert len(post(client, images[0], "?top_k=99")["top"]) == len(CLASSES)
        assert len(post(client, images[0])["top"]) == 5


def test_model_card_health_page_and_docs(served: ServedModel) -> None:
    with client_for(served, max_batch=4) as client:
        card = client.get("/v1/model").json()
        assert card["classes"] == CLASSES and card["image_size"] == list(TINY_VIT.img_size)
        assert card["parameters"] == count(served.model) and card["precision"] == AUTO
        assert card["architecture"] == "VisionTransformer" and card["attention"] == ["rollout"]
        assert client.get("/healthz").json()["status"] == "ok"
        page = client.get("/")
        assert page.status_code == 200 and 'id="top5"' in page.text and "http" not in page.text.replace(
            "http://www.w3.org", "")  # no CDN: everything the page needs is in it
        schema = client.get("/openapi.json").json()
        assert {"/v1/predict", "/v1/model", "/healthz"} <= set(schema["paths"])
        assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_rollout_grid_and_overlay(served: ServedModel, images: list[Path]) -> None:
    from vitlab.data.folder import read_image

    with client_for(served) as client:
        answer = post(client, images[3], "?attention=rollout")
        by_layer = post(client, images[3], "?attention=rollout&layers=true")["attention"]["layers"]
    pixels = torch.from_numpy(read_image(images[3], "RGB", TINY_VIT.img_size))[None]
    inputs = EvalTransform(TINY_VIT.img_size)(pixels)
    expected = attention_rollout(served.model, inputs)[0]
    np.testing.assert_allclose(answer["attention"]["grid"], expected.numpy(), rtol=0, atol=1e-6)
    assert answer["attention"]["layers"] is None and len(by_layer) == TINY_VIT.depth
    np.testing.assert_allclose(by_layer[-1], expected.numpy(), rtol=0, atol=1e-6)
    # Through one layer the class token keeps half of itself and takes half its head-mean attention to each patch.
    first = attention_maps(served.model, inputs)[0, 0].mean(0)[0, 1:].reshape(4, 4)
    np.testing.assert_allclose(by_layer[0], 0.5 * first.numpy(), rtol=0, atol=1e-6)
    prefix = "data:image/png;base64,"
    assert answer["attention"]["overlay_png"].startswith(prefix)
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["attention"]["overlay_png"][len(prefix):])))
    assert overlay.format == "PNG" and overlay.size == (224, 224)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def pcx_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PCX")  # a format Pillow reads, outside the allow-list
    return buffer.getvalue()


@pytest.mark.parametrize("body, status, needle", [
    (b"", 422, "empty body"),
    (b"hello, this is text and not an image", 415, "not an image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", 415, "not an image"),
    ("pcx", 415, "not an image"),
    (png_header(8000, 8000), 413, "64,000,000 pixels"),
    (png_header(20000, 20000), 413, "decompression bomb"),
    ("truncated", 422, "cannot decode"),
])
def test_bad_uploads_are_4xx_json_and_the_server_survives(served: ServedModel, images: list[Path], body: object,
                                                         status: int, needle: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    if body == "pcx":
        body = pcx_bytes()
    elif body == "truncated":
        whole = images[3].read_bytes()
        body = whole[:len(whole) // 2]
    caplog.set_level(logging.INFO, logger="vitlab.serve")
    with client_for(served) as client:
        for response in (client.post("/v1/predict", content=body),
                         client.post("/v1/predict", files={"file": ("upload", body)})):
            assert response.status_code == status, response.text
            assert needle in response.json()["error"]
        assert post(client, images[0])["top"]  # the worker is alive
    lines = [record.getMessage() for record in caplog.records if record.name == "vitlab.serve"]
    assert len(lines) == 3 and f"POST /v1/predict {status}" in lines[0] and "POST /v1/predict 200" in lines[2]


def test_upload_limit_parameters_and_multipart_without_file(served: ServedModel, images: list[Path]) -> None:
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > 10_000
    with client_for(served, max_upload_mb=0.01) as client:
        declared = client.post("/v1/predict", content=big.getvalue())
        streamed = client.post("/v1/predict", content=iter([big.getvalue()[:8000], big.getvalue()[8000:]]))
        for response in (declared, streamed):
            assert response.status_code == 413 and "--max-upload-mb" in response.json()["error"]
        assert "content-length" not in streamed.request.headers  # the limit held on the streamed bytes
        form_only = client.post("/v1/predict", content=b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
                                b"no image\r\n--x--\r\n", headers={"content-type": "multipart/form-data; boundary=x"})
        assert form_only.status_code == 422 and "no file part" in form_only.json()["error"]
        for query, needle in (("?top_k=0", "top_k"), ("?attention=gradcam", "attention")):
            response = client.post(f"/v1/predict{query}", content=images[0].read_bytes())
            assert response.status_code == 422 and needle in response.json()["error"]
        assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
        assert post(client, images[0])["top"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(checkpoint: Path,
                                                                     images: list[Path]) -> None:
    served = ServedModel(str(checkpoint), precision="fp32")  # bf16 rounds a batch of 8 unlike a batch of 1
    with client_for(served, max_batch=1) as client:
        alone = [post(client, path, "?attention=rollout" if index % 2 else "") for index, path in enumerate(images)]
    decoded_in: set[str] = set()
    prepare = served.prepare

    def prepare_and_record(data: bytes) -> torch.Tensor:
        decoded_in.add(threading.current_thread().name)
        return prepare(data)

    served.prepare = prepare_and_record  # type: ignore[method-assign]
    with client_for(served, max_batch=8, max_wait_ms=500) as client:
        with ThreadPoolExecutor(len(images)) as pool:
            together = list(pool.map(lambda pair: post(client, pair[1], "?attention=rollout" if pair[0] % 2 else ""),
                                     enumerate(images)))
        batches = client.get("/healthz").json()["batches"]
    assert max(int(size) for size in batches) > 1, batches
    # Uploads are decoded in the app's own pool, one thread per core at most, whatever the number of clients.
    assert decoded_in and all(name.startswith("vitlab-pixels") for name in decoded_in)
    assert len(decoded_in) <= pixel_threads() < len(images)
    for single, batched in zip(alone, together, strict=True):
        assert [item["label"] for item in single["top"]] == [item["label"] for item in batched["top"]]
        np.testing.assert_allclose([item["probability"] for item in single["top"]],
                                   [item["probability"] for item in batched["top"]], rtol=0, atol=1e-5)
        assert (single["attention"] is None) == (batched["attention"] is None)
        if single["attention"] is not None:
            np.testing.assert_allclose(single["attention"]["grid"], batched["attention"]["grid"], atol=1e-5)


def test_batcher_keeps_order_survives_a_failing_batch_and_respects_max_batch() -> None:
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(items)
        if -1 in items:
            raise RuntimeError("boom")
        return [item * 10 for item in items]

    async def scenario() -> tuple[list[object], list[int]]:
        batcher: Batcher[int, int] = Batcher(run, max_batch=3, max_wait_s=0.2)
        await batcher.start()
        try:
            first = await asyncio.gather(*(batcher.submit(item) for item in [1, -1, 2]), return_exceptions=True)
            second = await asyncio.gather(*(batcher.submit(item) for item in range(7)))
        finally:
            await batcher.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(result, RuntimeError) for result in first)
    assert second == [item * 10 for item in range(7)]
    assert max(len(batch) for batch in seen) == 3 and [len(batch) for batch in seen[1:]] == [3, 3, 1]


def test_precision_follows_training_s_amp_rule(checkpoint: Path, images: list[Path]) -> None:
    assert serving_precision("auto", torch.device("cpu")) == AUTO
    assert serving_precision("auto", torch.device("cuda")) == "bf16"
    assert serving_precision("fp32", torch.device("cuda")) == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the emulated-bf16 warning depends on this CPU
        bf16 = ServedModel(str(checkpoint), precision="bf16")
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(images[0]).convert("RGB").resize((32, 32)))]))
    inputs = EvalTransform(TINY_VIT.img_size)(pixels.permute(0, 3, 1, 2))
    fp32 = ServedModel(str(checkpoint), precision="fp32").run(inputs, [False])[0].probabilities
    half = bf16.run(inputs, [False])[0].probabilities
    assert bf16.card["precision"] == "bf16" and half.dtype == torch.float32
    torch.testing.assert_close(half, fp32, atol=0.05, rtol=0)


def test_cli_without_the_extra_and_with_a_missing_checkpoint(checkpoint: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "missing.safetensors")]) == 2
    one_error_line(capsys, "missing.safetensors")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", str(checkpoint)]) == 2
    one_error_line(capsys, "pip install 'vitlab[serve]'")


def test_a_slow_upload_does_not_hold_up_other_clients(served: ServedModel, images: list[Path]) -> None:
    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig("tiny"), served), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as slow:  # declares 100 kB, sends 10 bytes, stalls
            slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            started = time.perf_counter()
            connection.request("POST", "/v1/predict", body=images[0].read_bytes())
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["top"]
            assert time.perf_counter() - started < 5
            connection.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_grey_model_takes_colour_uploads(tmp_path: Path, images: list[Path]) -> None:
    grey = dataclasses.replace(TINY_VIT, in_chans=1)
    served = ServedModel(str(save_with_classes(random_model(grey), tmp_path / "grey.safetensors", CLASSES)))
    with client_for(served) as client:
        answer = post(client, images[3], "?attention=rollout")
    assert served.mode == "L" and served.card["in_chans"] == 1
    assert len(answer["top"]) == 5 and len(answer["attention"]["grid"]) == 4


def test_a_model_without_attention_answers_and_refuses_rollout(tmp_path: Path, images: list[Path]) -> None:
    from vitlab.models.mixer import MixerConfig, MlpMixer

    torch.manual_seed(0)
    mixer = MlpMixer(MixerConfig(img_size=(16, 16), patch_size=4, num_classes=5, embed_dim=24, depth=2,
                                 tokens_mlp_dim=12, channels_mlp_dim=48)).eval()
    served = ServedModel(str(save_with_classes(mixer, tmp_path / "mixer.safetensors", CLASSES)))
    with client_for(served) as client:
        assert client.get("/v1/model").json()["attention"] == []
        assert {item["label"] for item in post(client, images[0])["top"]} == set(CLASSES)
        refused = client.post("/v1/predict?attention=rollout", content=images[0].read_bytes())
    assert refused.status_code == 422 and "MlpMixer" in refused.json()["error"]


def test_mutated_images_are_answered_or_refused_never_500(served: ServedModel, images: list[Path]) -> None:
    rng = np.random.default_rng(0)
    statuses = set()
    with client_for(served) as client:
        for round_ in range(120):
            data = bytearray(images[round_ % len(images)].read_bytes())
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            cut = len(data) if rng.random() < 0.7 else int(rng.integers(1, len(data)))
            response = client.post("/v1/predict?attention=rollout", content=bytes(data[:cut]))
            assert response.status_code in (200, 413, 415, 422), (round_, response.text)
            assert response.status_code == 200 or response.json()["error"]
            statuses.add(response.status_code)
    assert 200 in statuses and len(statuses) > 1


def test_a_failing_forward_is_a_json_500_and_the_next_request_is_served(checkpoint: Path, images: list[Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    served = ServedModel(str(checkpoint))
    original = served.run
    calls = []

    def fail_once(*args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory, say")
        return original(*args)

    monkeypatch.setattr(served, "run", fail_once)
    with TestClient(create_app(ServeConfig(str(checkpoint)), served), raise_server_exceptions=False) as client:
        failed = client.post("/v1/predict", content=images[0].read_bytes())
        assert failed.status_code == 500 and "out of memory, say" in failed.json()["error"]
        assert post(client, images[0])["top"]
