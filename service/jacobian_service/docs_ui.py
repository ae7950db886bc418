"""``/docs`` (Swagger UI) and ``/redoc`` served from the installed packages, never a CDN.

The usual pages load Swagger UI and ReDoc from jsDelivr, so on a machine without
internet (an offline GPU cluster, a sandbox) they draw nothing. The scripts and styles
come from the ``fastapi-offline`` wheel instead (Swagger UI 5 and ReDoc 2, vendored and
kept current by that package); only its files are used, with one script of our own
(``docs.js``, below) that loads the OpenAPI document.

Every URL in the pages starts with the request's ``root_path``, so the pages work behind
a proxy that strips a prefix (``uvicorn --root-path``) and when the app is mounted under
a path.

The pages themselves hold nothing secret and load openly: a browser's page load cannot
carry an ``Authorization`` header, so behind a key they could never be opened at all.
``/openapi.json`` follows ``DOCS_AUTH``; when it wants a key, the page asks for one,
keeps it in the tab's ``sessionStorage``, fetches the document with it and authorizes
Swagger UI with it, so that "Try it out" sends it. The asset files are public Swagger UI
and ReDoc code and stay open too.

The pages name each asset with its content's digest (``?v=``): such a URL never changes
what it holds, so it is cached for a year (``immutable``), and an upgrade of the files
changes the URL. Any other URL of an asset is revalidated each time (``no-cache``); the
digest is also the ETag, answered with 304. Scripts and styles go gzipped to a browser
that accepts it (compression.py), under the ETag ``"<digest>-gzip"``: a validator names
one form of the bytes.
"""

from __future__ import annotations

import functools
import hashlib
import html
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from . import preconditions
from .compression import Compressible
from .errors import NotFound
from .responses import echo

__all__ = ["ASSETS_URL", "ASSET_FILES", "CSP", "asset", "assets_dir", "favicon", "redoc", "swagger_ui"]

ASSETS_URL = "/docs-assets"
ASSET_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
    "docs.js": "text/javascript",  # ours: _DOCS_JS
}
_VENDORED = [name for name in ASSET_FILES if name != "docs.js"]

# Fetches the OpenAPI document (with the key the page asked for, when it wants one) and
# hands it to Swagger UI or ReDoc. A served file, not inline script: the pages' CSP allows
# only this server's scripts. The settings come from its tag's data- attributes.
_DOCS_JS = r"""(function () {
  "use strict";
  var tag = document.currentScript;
  var ui = tag.dataset.ui, specUrl = tag.dataset.spec, root = tag.dataset.root;
  // The key is kept per path prefix: sessionStorage is the origin's, and services behind
  // one gateway under two prefixes (/jacobian-cpu, /jacobian-gpu; staging and production)
  // are one origin. Under one name for all, the docs of one read the key given to the
  // other's and sent it there (a 403, the key asked again, which then overwrote the
  // first's: each page asked again whenever the other had been opened in the tab).
  var STORE = "jacobian-service-api-key" + (root ? " " + root : "");
  var form = document.getElementById("api-key");
  var say = document.getElementById("api-key-message");

  function stored() {
    try { return sessionStorage.getItem(STORE) || ""; } catch (e) { return ""; }
  }
  function keep(key) {
    try { if (key) sessionStorage.setItem(STORE, key); else sessionStorage.removeItem(STORE); } catch (e) {}
  }
  function ask(message) {
    return new Promise(function (resolve) {
      form.hidden = false;
      say.textContent = message;
      form.elements.key.value = "";
      form.elements.key.focus();
      form.onsubmit = function (event) {
        event.preventDefault();
        form.hidden = true;
        say.textContent = "";
        resolve(form.elements.key.value.trim());
      };
    });
  }
  function fetchSpec(key) {
    var headers = {Accept: "application/json"};
    if (key) headers.Authorization = "Bearer " + key;
    return fetch(specUrl, {headers: headers, cache: "no-store"});
  }

  // Swagger UI pretty-prints and renders a JSON answer whole, in the page: mlp's Hessian
  // (14 MB, an example of the list) froze the tab for minutes. An answer over 1 MB is
  // offered as a file instead, as the .npy answers are (Content-Disposition: attachment,
  // which only this page reads: the answer itself is unchanged). What costs is the
  // values, not the bytes: each is a line of its own once pretty-printed, and the
  // highlighter makes elements of each. A 0.9 MB sparsity pattern (320,000 indices)
  // froze the tab for minutes too; a JSON answer of more than MANY values is a file.
  var LARGE = 1 << 20, MANY = 10000;
  function manyValues(text) {  // more than MANY values (or containers) in a JSON text?
    for (var i = 0, n = 0; i < text.length; i++) {
      var c = text.charCodeAt(i);
      if ((c === 44 || c === 91 || c === 123) && ++n > MANY) return true;  // , [ {
    }
    return false;
  }
  // The name such a file is saved under follows the server's rule for its .npy / .npz
  // answers (responses.attachment): RFC 6266's filename of [A-Za-z0-9._-], and for a name
  // with letters or digits of another script filename* (RFC 8187, UTF-8) keeping them.
  // The page wrote the URL's percent-encoded segments into filename=, which RFC 6266
  // reads as they are (größe's answer: filename="gr%C3%B6%C3%9Fe-jacobian.json", shown
  // so among the answer's headers), and kept what the server's names never hold (a
  // quote, ';', '%20').
  function attachment(stem) {
    var plain = stem.replace(/[^A-Za-z0-9._-]/gu, "_");  // (u: one "_" per character, astral ones too)
    var value = 'attachment; filename="' + plain + '.json"';
    var wide = stem.replace(/[^\p{L}\p{N}_.-]/gu, "_");  // (Python's \w: the letters and digits of every script)
    return wide === plain ? value : value + "; filename*=UTF-8''" + encodeURIComponent(wide + ".json");
  }
  function decoded(segment) {
    try { return decodeURIComponent(segment); } catch (e) { return segment; }
  }
  function offerLargeAsFile(response) {
    var headers = response.headers || {}, text = response.text;
    if (typeof text !== "string" || headers["content-disposition"]) return response;
    if (text.length > LARGE || (/json/i.test(headers["content-type"] || "") && manyValues(text))) {
      var path = String(response.url || "").split("?")[0].split("/").filter(Boolean).slice(-2);
      headers["content-disposition"] = attachment(path.map(decoded).join("-"));
      response.headers = headers;
    }
    return response;
  }

  // Swagger UI shows a parameter's values ("Available values", "Default value",
  // "Example") through its Markdown renderer, which reads HTML: the path parameter's
  // values are the registered function names, so a name such as <img src=x onerror=...>
  // was drawn as an image (its handler stopped by the CSP only), and markdown in a name
  // as a link. Those lines are values, never prose: shown as text.
  var VALUE_LINES = ["<i>Available values</i> : ", "<i>Default value</i> : ", "<i>Example</i> : "];
  function valuesAsText() {
    return {wrapComponents: {Markdown: function (Original, system) {
      return function (props) {
        var h = system.React.createElement, source = String(props.source == null ? "" : props.source);
        var lead = VALUE_LINES.filter(function (l) { return source.indexOf(l) === 0; })[0];
        if (lead === undefined) return h(Original, props);
        return h("div", {className: ((props.className || "") + " markdown").trim()},
                 h("p", null, h("i", null, lead.slice(3, lead.indexOf("</i>"))), " : " + source.slice(lead.length)));
      };
    }}};
  }

  // A key goes in a header, which carries printable ASCII only here (the server compares
  // the header's bytes with its keys). A key pasted with a character copied along (a
  // zero-width space, a typographic quote) made fetch() throw before sending anything:
  // the page said "The API description could not be loaded: Failed to execute 'fetch'
  // ... non ISO-8859-1 code point" and disabled the field, until the page was reloaded.
  // Such a key is asked for again, the character named.
  function unsendable(value) {  // "U+200B" for the first character a header cannot carry, else ""
    var bad = /[^\x20-\x7e]/.exec(value);
    return bad ? "U+" + ("000" + bad[0].charCodeAt(0).toString(16).toUpperCase()).slice(-4) : "";
  }
  async function askSendable(message) {
    for (;;) {
      var key = await ask(message), bad = unsendable(key);
      if (!bad) return key;
      message = "That key holds " + bad + ", which a header cannot carry (a character copied with it?); " +
                "type the key again.";
    }
  }
  // The same key typed into Swagger UI's Authorize dialog was let through to fetch(),
  // which threw: Execute showed "TypeError: Failed to execute 'fetch' on 'Window': ...
  // non ISO-8859-1 code point", naming neither the key nor the character, and the page's
  // own call for vjp's body threw into the console. Such a request is not sent; Execute
  // says which header holds what, and what to do (as the fetch that fails it: an error
  // thrown here left Swagger UI's answer blank).
  function sendableHeaders(request) {
    var said = "";
    Object.keys(request.headers || {}).some(function (name) {
      var bad = unsendable(String(request.headers[name]));
      if (bad) said = name.toLowerCase() === "authorization"
        ? "The key given to Authorize holds " + bad + ", which a header cannot carry (a character copied with " +
          "it?): Logout there and type the key again."
        : "The " + name + " header holds " + bad + ", which a header cannot carry: type it again.";
      return !!bad;
    });
    if (said) request.userFetch = function () { return Promise.reject(new Error(said)); };
    return request;
  }

  async function main() {
    var key = stored();
    // The page says when the document wants a key: asked first, not after a request
    // sent without one (its 401 was an error in the console of every new tab).
    if (!key && tag.dataset.key === "wanted") key = await askSendable("");
    var response = await fetchSpec(key);
    while (response.status === 401 || response.status === 403) {
      keep("");
      key = await askSendable(response.status === 403 ? "That key was refused; try another." : "");
      response = await fetchSpec(key);
    }
    if (!response.ok) throw new Error(specUrl + " answered " + response.status);
    keep(key);
    var spec = await response.json();
    // Calls go where the page came from (a proxy's prefix included), unless the
    // document names its servers (ROOT_PATH).
    if (!spec.servers && root) spec.servers = [{url: root}];
    if (ui === "redoc") {
      Redoc.init(spec, {}, document.getElementById("redoc"));
      return;
    }
    var swagger = SwaggerUIBundle({
      spec: spec, dom_id: "#swagger-ui", presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
      deepLinking: true, validatorUrl: null, plugins: [valuesAsText],
      // The key the document was read with authorizes "Try it out" too (the Authorize
      // button shows it, and logs it out).
      onComplete: function () { if (key) swagger.preauthorizeApiKey("bearer", key); },
      requestInterceptor: sendableHeaders, responseInterceptor: offerLargeAsFile
    });
    // The examples are per function (the request body's, the sparsity query's shapes),
    // but Swagger UI keeps the first one whatever function "Try it out" picks: Execute
    // sent the first function's inputs to the one picked (a 422). Picking a function
    // now picks its examples too.
    document.addEventListener("change", function (event) {
      var picked = event.target;
      if (!picked.matches || !picked.matches('tr[data-param-name="name"] select')) return;
      var block = picked.closest(".opblock");
      var lists = block ? block.querySelectorAll("select.examples-select-element") : [];
      var setValue = Object.getOwnPropertyDescriptor(HTMLSelectElement.prototype, "value").set;
      Array.prototype.forEach.call(lists, function (list) {
        var has = Array.prototype.some.call(list.options, function (o) { return o.value === picked.value; });
        if (!has || list.value === picked.value) return;
        setValue.call(list, picked.value);  // as a user's pick: React hears the change event
        list.dispatchEvent(new Event("change", {bubbles: true}));
      });
      if (vectorKind(block)) fillVectors(block, picked.value);
    });
    // vjp has no examples in the document: cotangents take the output's shape, which no
    // declaration gives, and Swagger UI's body made from the schema was refused for every
    // function (422 "data holds 1 numbers; shape [0] needs 0"). On "Try it out" and on
    // each function picked, the page asks the function's output at its example inputs
    // (/evaluate, with the key given to Authorize, else the one the document was read
    // with) and writes the body: those inputs,
    // and cotangents of 0.5 shaped as that output. hvp's examples (inputs, tangents) are
    // right for a function of one scalar output only: every other function's was a 422
    // ("hvp needs a function with one scalar (0-d) output, or 'cotangents' ..."), so its
    // body gets such cotangents too (c . H t).
    document.addEventListener("click", function (event) {
      var button = event.target.closest && event.target.closest(".try-out__btn");
      var block = button && button.closest(".opblock");
      if (!vectorKind(block) || button.classList.contains("cancel")) return;
      setTimeout(function () {
        var select = block.querySelector('tr[data-param-name="name"] select');
        if (select) fillVectors(block, select.value);
      }, 0);
    });

    function authorized() {  // the key given to Authorize (DOCS_AUTH=false asks for none up front)
      try { return swagger.authSelectors.authorized().getIn(["bearer", "value"]) || ""; } catch (e) { return ""; }
    }
    function vectorKind(block) {  // "vjp", "hvp" or null: the operations whose body the page writes
      var path = block && block.querySelector(".opblock-summary-path");
      var kind = path && /^\/v1\/functions\/\{name\}\/(vjp|hvp)$/.exec(path.getAttribute("data-path"));
      return kind ? kind[1] : null;
    }
    function shaped(tree) {  // 0.5 in the shape of each array of an answer's tree
      if (Array.isArray(tree)) return tree.map(shaped);
      if (tree && Array.isArray(tree.shape) && "dtype" in tree) {
        var value = 0.5;
        for (var i = tree.shape.length - 1; i >= 0; i--) value = new Array(tree.shape[i]).fill(value);
        return value;
      }
      var out = {};
      Object.keys(tree || {}).forEach(function (k) { out[k] = shaped(tree[k]); });
      return out;
    }
    async function fillVectors(block, name) {
      var kind = vectorKind(block);
      var from = spec.paths["/v1/functions/{name}/" + (kind === "hvp" ? "hvp" : "jvp")];
      var examples = (((from && from.post.requestBody.content["application/json"]) || {}).examples) || {};
      // (own keys only: a function named constructor has no example, yet every object has one)
      if (!Object.prototype.hasOwnProperty.call(examples, name)) return;
      var inputs = examples[name].value.inputs;
      var headers = {"Content-Type": "application/json", Accept: "application/json"};
      var bearer = authorized() || key;
      if (unsendable(bearer)) return;  // fetch() would throw; Execute says why (sendableHeaders)
      if (bearer) headers.Authorization = "Bearer " + bearer;
      var base = (spec.servers && spec.servers[0] && spec.servers[0].url) || root;
      var response = await fetch(base + "/v1/functions/" + encodeURIComponent(name) + "/evaluate",
                                 {method: "POST", headers: headers, body: JSON.stringify({inputs: inputs})})
        .catch(function () { return null; });  // (the server gone: as an answer that is no output)
      if (!response || !response.ok) return;  // Execute then shows what the function makes of it
      var output = (await response.json()).output;
      var body = {inputs: inputs, cotangents: shaped(output)};
      if (kind === "hvp") {
        if (output && Array.isArray(output.shape) && output.shape.length === 0) return;  // a scalar: the example is right
        body = {inputs: inputs, tangents: examples[name].value.tangents, cotangents: body.cotangents};
      }
      // a function whose first input is an integer: the example differentiates another
      if ("argnums" in examples[name].value) body.argnums = examples[name].value.argnums;
      var text = block.querySelector("textarea.body-param__text");
      var select = block.querySelector('tr[data-param-name="name"] select');
      if (!text || (select && select.value !== name)) return;  // closed, or another function picked since
      var setText = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value").set;
      setText.call(text, JSON.stringify(body, null, 2));
      text.dispatchEvent(new Event("input", {bubbles: true}));
    }
  }

  main().catch(function (error) {
    form.hidden = false;
    form.elements.key.disabled = true;
    say.textContent = "The API description could not be loaded: " + error.message;
  });
})();
"""

# A small form the script shows when the document wants a key. Its text says where the
# key goes.
_KEY_FORM = """<form id="api-key" hidden style="font: 14px sans-serif; max-width: 46em; margin: 2em auto; padding: 1em;
  border: 1px solid #ccc; border-radius: 4px">
<p>This server's API description needs an API key (<code>DOCS_AUTH</code>).</p>
<label>API key <input name="key" type="password" autocomplete="off" required size="40"></label>
<button type="submit">Show the API</button>
<p id="api-key-message" role="alert" style="color: #b00"></p>
<p style="color: #555">The key is kept in this tab only (sessionStorage), for this server's path alone, sent
as <code>Authorization: Bearer</code> for the description, and authorizes "Try it out".</p>
</form>"""


@functools.cache
def assets_dir() -> Path:
    """The folder with the Swagger UI and ReDoc files (raises if a file is missing)."""
    import fastapi_offline

    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    missing = [name for name in _VENDORED if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline at {folder} lacks {', '.join(missing)}")
    return folder


# ReDoc's bundle draws its maker's logo from cdn.redoc.ly in the sidebar of every page,
# with no option to leave it out: the CSP refused it (offline, a page must not try other
# hosts), and that refusal was an error in the console of every /redoc opened. Our copy
# of the bundle names an empty image in its place, which the CSP allows (data:); the
# logo's link ("API docs by Redocly") stays. The one change made to a vendored file.
_REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
_NO_LOGO = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' width='0' height='0'/%3E"


@functools.cache
def _asset_file(name: str) -> tuple[bytes, str]:
    """An asset's bytes and the digest of them, read once (a few MB in all)."""
    body = _DOCS_JS.encode() if name == "docs.js" else (assets_dir() / name).read_bytes()
    if name == "redoc.standalone.js":
        body = body.replace(_REDOC_LOGO, _NO_LOGO)
    return body, hashlib.sha256(body).hexdigest()[:16]


@functools.cache
def _compressible(name: str) -> Compressible:
    """A text asset with its gzip form, made once (the PNG is compressed already)."""
    return Compressible(_asset_file(name)[0])


def _root(request: Request) -> str:
    return html.escape(str(request.scope.get("root_path", "")).rstrip("/"), quote=True)


def _url(root: str, name: str) -> str:
    """An asset's versioned URL (see the module's docstring)."""
    return f"{root}{ASSETS_URL}/{name}?v={_asset_file(name)[1]}"


# The pages' Content-Security-Policy: nothing but this server's scripts run, and the page
# reaches nothing but this server (our copy of ReDoc's bundle no longer names its logo on
# cdn.redoc.ly: _asset_file). Swagger UI and ReDoc set inline styles and ReDoc searches in a blob: worker;
# there is no inline script (docs.js is a file) and no eval.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'self'")


def _page(request: Request, title: str, head: str, body: str, ui: str) -> Response:
    root = _root(request)
    service = request.scope.get("service")
    wanted = service is not None and bool(service.api_keys) and service.settings.docs_auth  # AuthMiddleware's rule
    # lang: a screen reader reads the page in the language it names (WCAG 3.1.1); the
    # pages named none, and were read in whatever the reader's own settings said.
    # viewport: a phone lays the page out at its own width (ReDoc then draws its mobile
    # menu); without it both pages were laid out 980 px wide and shrunk to fit.
    return HTMLResponse(headers={"Content-Security-Policy": CSP}, content=f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>jacobian-service - {title}</title>
{head}<link rel="icon" href="{_url(root, "favicon.png")}"></head>
<body>{_KEY_FORM}
{body}
<script src="{_url(root, "docs.js")}" data-ui="{ui}" data-spec="{root}/openapi.json" data-root="{root}"{' data-key="wanted"' if wanted else ''}></script>
</body></html>""")


async def swagger_ui(request: Request) -> Response:
    root = _root(request)
    return _page(request, "Swagger UI", f'<link rel="stylesheet" href="{_url(root, "swagger-ui.css")}">\n',
                 f'<div id="swagger-ui"></div>\n<script src="{_url(root, "swagger-ui-bundle.js")}"></script>', "swagger")


async def redoc(request: Request) -> Response:
    root = _root(request)
    return _page(request, "ReDoc", "",
                 f'<div id="redoc"></div>\n<script src="{_url(root, "redoc.standalone.js")}"></script>',
                 "redoc")


async def favicon(request: Request) -> Response:
    """``/favicon.ico``: the pages' icon. A browser asks for it by itself beside every
    page that names none (a JSON answer opened, the 404 at ``/``): each was a 404, or
    with API keys a 401, in the access log and the metrics, one per page a user opened."""
    return await asset(request, "favicon.png")


async def asset(request: Request, file: str) -> Response:
    media_type = ASSET_FILES.get(file)
    if media_type is None:  # only the named files: no path ever reaches the file system
        raise NotFound(f"no docs asset {echo(file)}")
    body, digest = _asset_file(file)
    versioned = request.query_params.get("v") == digest
    headers = {"Cache-Control": "public, max-age=31536000, immutable" if versioned else "no-cache"}
    tags = [f'"{digest}"']
    if media_type.startswith("text/"):
        body, encoding = _compressible(file).choose(request.headers.get("accept-encoding", ""))
        headers.update(encoding)
        tags.append(f'"{digest}-gzip"')
        if "Content-Encoding" in encoding:
            tags.reverse()  # the tag of the form this answer would send first
    # A client holding either form has these bytes: 304, with the tag it holds; unless
    # an If-Match is false, which RFC 9110 13.2.2 evaluates first (the router's 412 for
    # the 200 below): an If-Match naming no current tag beside an If-None-Match naming
    # one was a 304, the client told its copy is current where the answer it guarded is
    # not there. (The lists read as preconditions.py reads them: a tag may hold a ",".)
    conditions = request.scope["headers"]
    held = preconditions.none_match_held(conditions, tags) if preconditions.if_match_holds(conditions, tags[0]) else None
    if held is not None:
        return Response(status_code=304, headers={**headers, "ETag": held})
    headers["ETag"] = tags[0]
    return Response(body, media_type=media_type, headers=headers)
