"""Security: the API key guards every route but /health, is compared in constant time and never logged; the model
loaders run no code from a checkpoint (no remote code, no pickles)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from router.ingress import OpenAIIngress, app
from tests.serve.conftest import ServedApp

WRONG_KEY = "wrong-key-5f1d0c9a"


def _routes() -> list[tuple[str, str]]:
    """Every (method, path) the ingress serves, from its own route table: a route added later is covered too."""

    def flatten(routes: list) -> list:  # routers included in the app hold their own routes
        flat = []
        for route in routes:
            included = getattr(route, "original_router", None)
            flat.extend(flatten(included.routes) if included is not None else [route])
        return flat

    return [(method, route.path) for route in flatten(app.routes)
            for method in sorted(getattr(route, "methods", None) or ()) if method != "HEAD"]  # fmt: skip


def test_the_route_table_is_what_the_security_tests_expect() -> None:
    paths = {path for _, path in _routes()}
    assert {"/health", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions", "/generate"} <= paths


@pytest.mark.parametrize(("method", "path"), [r for r in _routes() if r[1] != "/health"])
def test_every_route_but_health_needs_the_key(default_app: ServedApp, method: str, path: str) -> None:
    url = default_app.base_url + path
    body = None
    if method == "POST":  # one body for every POST route (unknown fields are refused only after the key check)
        body = {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    missing = httpx.request(method, url, json=body, timeout=60)
    wrong = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=60)
    for response in (missing, wrong):
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert WRONG_KEY not in response.text
    # With the key the route is reachable (whatever it then says about this body).
    right = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {default_app.api_key}"},
                          timeout=120)  # fmt: skip
    assert right.status_code != 401, (method, path)


def test_health_needs_no_key(default_app: ServedApp) -> None:
    assert httpx.get(f"{default_app.base_url}/health", timeout=60).status_code == 200


def test_the_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.ingress

    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(router.ingress.hmac, "compare_digest", spy)
    ingress = SimpleNamespace(_api_key=b"secret")
    request = SimpleNamespace(headers={"authorization": "Bearer guess"})
    with pytest.raises(Exception, match="invalid or missing API key"):
        OpenAIIngress.func_or_class._authorize(ingress, request)
    assert compared == [(b"guess", b"secret")]


def test_the_key_never_reaches_a_log(default_app: ServedApp) -> None:
    """Requests with the right and a wrong key, then every log file of this Ray session is searched for both."""
    import ray

    headers_right = {"Authorization": f"Bearer {default_app.api_key}"}
    httpx.get(f"{default_app.v1}/models", headers=headers_right, timeout=60)
    httpx.post(f"{default_app.v1}/completions", json={"prompt": "Hi", "max_tokens": 2},
               headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=60)  # fmt: skip
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [path for path in logs.rglob("*") if path.is_file()]
    assert files
    for path in files:
        content = path.read_bytes()
        assert default_app.api_key.encode() not in content, f"the API key is in {path}"
        assert WRONG_KEY.encode() not in content, f"a presented key is in {path}"


# --- model loading runs no code from the checkpoint -------------------------------------------------------------------


def _booby_trapped(tiny_llama_dir: Path, directory: Path) -> Path:
    """The tiny model with `auto_map` entries pointing at a module that leaves a marker file when imported."""
    shutil.copytree(tiny_llama_dir, directory)
    marker = directory / "REMOTE_CODE_RAN"
    (directory / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer_config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.exists() else {}
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    tokenizer_config_path.write_text(json.dumps(tokenizer_config))
    return directory


def test_remote_code_in_a_checkpoint_is_never_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from replicas import LLMEngine
    from router.tokenization import PromptTokenizer

    model_dir = _booby_trapped(tiny_llama_dir, tmp_path / "trapped")
    loaders = (
        lambda: PromptTokenizer(str(model_dir)),
        lambda: LLMEngine.from_kwargs(str(model_dir), kv_cache_memory_bytes=8 * 2**20, num_threads=1),
    )
    for load in loaders:
        try:
            load()
        except Exception:  # noqa: BLE001 — refusing is fine; running the code is not
            pass
        assert not (model_dir / "REMOTE_CODE_RAN").exists()
