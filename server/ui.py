"""The live canvas page: ``/`` (index.html), ``/ui/static/*`` (app.js, style.css) and two small
read-only JSON endpoints the page needs besides the public API:

- ``GET /ui/config``: model name, canvas length, context length and the default diffusion
  parameters (the checkpoint's generation config), and whether an API key is required.
- ``POST /ui/detokenize`` ``{"ids": [...]}`` -> ``{"texts": [...], "special": [...]}``: each id
  decoded on its own (special tokens included, e.g. the mask token, and flagged in ``special``;
  the page fetches a vocabulary of up to 4096 ids whole, once, larger ones id by id as they appear),
  so the page can draw one cell per canvas position from the draft chunks' ``changed`` /
  ``changed_token_ids`` without a tokenizer. (The draft's ``text`` cannot be split into positions:
  it skips special tokens and a token need not be one character.) Ids outside the vocabulary
  decode to ``""``.

When the server has API keys, both JSON endpoints want the same bearer key as ``/v1/*``
(``/ui/config`` without it answers only ``{"auth_required": true, "authorized": false}``). The
page itself (static files) is always open. ``--no-ui`` leaves all of this out: ``/`` is a 404.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from . import errors
from .auth import bearer_token, key_matches
from .bodies import BodyLimits, read_json

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_DETOKENIZE_IDS = 4096

# The SamplingParams fields the page shows as editable diffusion parameters.
DIFFUSION_PARAMS = (
    "max_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
    "stability_threshold", "confidence_threshold",
)

router = APIRouter()


def _keys(request: Request) -> list[bytes]:
    return [k.encode("utf-8") for k in request.app.state.server.settings.api_keys if k]


def _authorized(request: Request) -> bool:
    keys = _keys(request)
    return not keys or key_matches(bearer_token(request.scope.get("headers", [])), keys)


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/config", include_in_schema=False)
async def ui_config(request: Request):
    state = request.app.state.server
    auth_required = bool(_keys(request))
    if not _authorized(request):
        return JSONResponse({"auth_required": True, "authorized": False})
    engine = state.engine  # None while loading
    defaults = {name: getattr(engine.default_params, name) for name in DIFFUSION_PARAMS} if engine else {}
    return JSONResponse({
        "auth_required": auth_required,
        "authorized": True,
        "status": state.live_status,
        "model": state.model_names()[0],
        "canvas_length": engine.canvas_length if engine else None,
        "max_model_len": engine.max_model_len if engine else None,
        "vocab_size": len(engine.tokenizer) if engine else None,
        "defaults": defaults,
    })


@router.post("/ui/detokenize", include_in_schema=False)
async def ui_detokenize(request: Request):
    """Token ids to texts for the page (a POST: with API keys, the key check has passed; server.auth)."""
    state = request.app.state.server
    settings = state.settings
    # the same strict, bounded parsing as /v1 (depth, values, no NaN, invalid UTF-8 ...)
    limits = BodyLimits(settings.max_json_depth, settings.max_json_values, MAX_DETOKENIZE_IDS,
                        f"more than /ui/detokenize takes (at most {MAX_DETOKENIZE_IDS} ids per request).", "ids",
                        max_numbers=MAX_DETOKENIZE_IDS + settings.max_json_values,
                        numbers_why=f"{MAX_DETOKENIZE_IDS} ids + max_json_values")
    body = await read_json(request, limits, state.preprocess_gate, require_object=False)
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise errors.bad_request("'ids' must be a list of integers", "ids")
    if len(ids) > MAX_DETOKENIZE_IDS:
        raise errors.bad_request(f"at most {MAX_DETOKENIZE_IDS} ids per request", "ids")
    engine = request.app.state.server.engine_or_503()
    tokenizer = engine.tokenizer
    vocab = len(tokenizer)
    special_ids = _special_ids(tokenizer)
    texts = [tokenizer.decode([i], skip_special_tokens=False) if 0 <= i < vocab else "" for i in ids]
    return {"texts": texts, "special": [i in special_ids for i in ids]}


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in added.items() if getattr(tok, "special", False))
    return ids


class RevalidatedFiles(StaticFiles):
    """The page's assets, revalidated at every load (their ETag makes that a 304): after an upgrade a
    browser never runs an old app.js against the new page."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install_ui(app: FastAPI) -> None:
    """Add the page, its assets and the two JSON endpoints to ``app``."""
    app.include_router(router)
    app.mount("/ui/static", RevalidatedFiles(directory=STATIC_DIR, check_dir=False), name="ui-static")
