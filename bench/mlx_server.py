"""mlx-lm's own server as the peer: started on a free port, timed through its streaming API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from bench.api_vs_engine import Stream
from tests.daemon import free_port

START_TIMEOUT = 180.0


class MlxServer:
    """`python -m mlx_lm.server --model DIR` on a free port, its log in `log_path`."""

    def __init__(self, model_dir: str, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlx_lm.server",
                    "--model",
                    model_dir,
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited:\n{self.log_path.read_text()}")
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlx_lm.server did not start:\n{self.log_path.read_text()}")

    def stream(self, messages: list[dict[str, Any]], max_tokens: int) -> Stream:
        """One greedy streamed chat completion, timed to its first content and its end."""
        body = {
            # Any other name makes mlx_lm.server try to load a model by that name.
            "model": "default_model",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        first = None
        first_any = None  # whitespace counts when nothing else comes
        text: list[str] = []
        usage: dict[str, Any] = {}
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            # Lines starting with ":" are keep-alives it writes during prefill.
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    content = choice.get("delta", {}).get("content")
                    if content:
                        first_any = first_any or time.perf_counter()
                        if content.strip():  # as Pensieve's, which drop leading whitespace
                            first = first or time.perf_counter()
                        text.append(content)
        end = time.perf_counter()
        first = first or first_any
        assert first is not None, "the stream carried no content"
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return Stream(
            started,
            first,
            end,
            usage["completion_tokens"],
            usage["prompt_tokens"],
            cached,
            "".join(text),
        )

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
