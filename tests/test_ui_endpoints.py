"""The live canvas page's server side: ``/``, ``/ui/static/*``, ``/ui/config``, ``/ui/detokenize``
and the ``--ui/--no-ui`` switch (no browser needed; see test_ui_browser.py for the page itself)."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import settings_from_args
from server.settings import ServerSettings
from server.ui import STATIC_DIR


def _no_engine(settings, stats_sink):
    raise RuntimeError("no engine in this test")


def test_ui_flag_defaults_on_and_turns_off(tmp_path):
    assert settings_from_args([]).ui is True
    assert settings_from_args(["--no-ui"]).ui is False
    assert settings_from_args(["--ui"]).ui is True
    config = tmp_path / "c.yaml"
    config.write_text("ui: false\n")
    assert settings_from_args(["--config", str(config)]).ui is False


@pytest.mark.parametrize("ui", [True, False])
def test_no_ui_means_404(ui):
    app = create_app(ServerSettings(model="x", ui=ui), engine_factory=_no_engine)
    with TestClient(app) as client:
        for path in ("/", "/ui/config", "/ui/static/app.js", "/ui/static/index.html"):
            r = client.get(path)
            assert r.status_code == (200 if ui else 404), path
        assert client.post("/ui/detokenize", json={"ids": [1]}).status_code == (503 if ui else 404)
        assert client.get("/metrics").status_code == 200


def test_static_files_fetch_nothing_beyond_the_server():
    """No CDN, font or analytics: every URL in the page's files is a path on this server."""
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text, name
        assert "@import" not in text and "url(" not in text, name
        assert not re.search(r"""["'(]//""", text), name  # protocol-relative URLs
    html = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"#]+)"', html) == ["/ui/static/style.css", "/ui/static/app.js"]


def test_page_and_assets_are_served(live_server):
    r = httpx.get(live_server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/ui/static/app.js" in r.text
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{live_server.url}/ui/static/{name}", timeout=10)
        assert r.status_code == 200 and ctype in r.headers["content-type"], name
        # revalidated at every load, so that an upgraded server's page never runs an old app.js
        assert r.headers["cache-control"] == "no-cache" and r.headers["etag"], name
        again = httpx.get(f"{live_server.url}/ui/static/{name}", headers={"If-None-Match": r.headers["etag"]}, timeout=10)
        assert again.status_code == 304, name
    assert httpx.get(live_server.url + "/ui/static/../ui.py", timeout=10).status_code == 404


def test_config_wants_the_key_when_the_server_has_keys(live_server):
    r = httpx.get(live_server.url + "/ui/config", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"auth_required": True, "authorized": False}  # nothing else without the key
    bad = httpx.get(live_server.url + "/ui/config", headers={"Authorization": "Bearer nope"}, timeout=10).json()
    assert bad == {"auth_required": True, "authorized": False}
    cfg = httpx.get(live_server.url + "/ui/config", headers=live_server.headers, timeout=10).json()
    assert cfg["auth_required"] is True and cfg["authorized"] is True and cfg["status"] == "ready"
    assert cfg["model"] == live_server.model_name
    assert cfg["canvas_length"] == 16 and cfg["max_model_len"] == 4096 and cfg["vocab_size"] == 261
    assert cfg["defaults"] == {
        "max_tokens": 16, "max_denoising_steps": 8, "entropy_bound": 0.2, "t_min": 0.3, "t_max": 0.9,
        "stability_threshold": 2, "confidence_threshold": 0.004,
    }


def test_config_without_keys(server_launcher, server_tiny_checkpoint):
    server = server_launcher(["--model", str(server_tiny_checkpoint), "--served-model-name", "open-tiny"])
    cfg = httpx.get(server.url + "/ui/config", timeout=10).json()
    assert cfg["auth_required"] is False and cfg["authorized"] is True and cfg["model"] == "open-tiny"
    r = httpx.post(server.url + "/ui/detokenize", json={"ids": [0, 5, 70]}, timeout=10)
    assert r.status_code == 200 and r.json()["texts"] == ["<pad>", "\x00", "A"]


def test_detokenize(live_server):
    url = live_server.url + "/ui/detokenize"
    r = httpx.post(url, json={"ids": [1]}, timeout=10)
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    h = live_server.headers
    # byte-level tiny tokenizer: 5 special tokens, then bytes 0..255 (id 5 + b)
    r = httpx.post(url, json={"ids": [0, 4, 5 + ord("H"), 5 + ord("i"), 5 + 0xC3, 260, 261, -1]}, headers=h, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["texts"] == ["<pad>", "<end_of_turn>", "H", "i", "\ufffd", "\ufffd", "", ""]
    assert body["special"] == [True, True, False, False, False, False, False, False]
    assert httpx.post(url, json={"ids": []}, headers=h, timeout=10).json() == {"texts": [], "special": []}

    for bad in ({"ids": "1"}, {"ids": [1.5]}, {"ids": [True]}, {"nope": []}, [1, 2]):
        r = httpx.post(url, json=bad, headers=h, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "ids", bad
    r = httpx.post(url, content=b"{not json", headers={**h, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    r = httpx.post(url, json={"ids": [5] * 4097}, headers=h, timeout=10)
    assert r.status_code == 400 and "4096" in r.json()["error"]["message"]
