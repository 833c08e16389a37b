"""Helpers shared by the collect tests: a task, a config, and a local HTTP server."""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path
from typing import Iterator

from pipelines.config import CollectConfig
from pipelines.tasks import Task


def make_task(fields=("mr", "ref"), labels=None, name="t") -> Task:
    return Task(name=name, kind="classification" if labels else "generation", fields=tuple(fields),
                group_key=fields[0], prompt="{{ %s }}" % fields[0], target=" {{ %s }}" % fields[-1],
                zero_shot="{{ %s }}" % fields[0], target_field=fields[-1], labels=labels or {},
                text_fields=tuple(fields))


def source(name: str, uri: str, columns=("mr", "ref"), splits=None, **options) -> dict:
    """A source declaration as params.yaml holds it; ``columns`` as a tuple means identity."""
    return {"name": name, "uri": uri,
            "columns": columns if isinstance(columns, dict) else {c: c for c in columns},
            "splits": splits or {"train": 0.5, "test": 0.5}, **options}


def config(*sources: dict, task: str = "t", **options) -> CollectConfig:
    return CollectConfig.model_validate({"sources": {task: list(sources)}, **options})


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test output is not an access log
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1; yields the base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
