"""The API's reference page at ``/docs``, rendered here from the OpenAPI document: one self-contained
HTML page, no script and nothing fetched from elsewhere (FastAPI's Swagger UI and ReDoc load their code
from a CDN, which a machine without internet, or a strict content policy, cannot reach)."""

from __future__ import annotations

import html
import json

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:1px solid #ccc} h3{margin:1.4em 0 .3em;font-size:1.05em}
code,.m{font-family:ui-monospace,monospace} .m{display:inline-block;min-width:4.5em;font-weight:bold}
.get{color:#16a} .post{color:#183} .put{color:#a60} .patch{color:#a60} .delete{color:#b22}
table{border-collapse:collapse;margin:.3em 0 .8em} td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4} .d{color:#555}
"""


def _type(schema: dict) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#schema-{html.escape(name)}">{html.escape(name)}</a>'
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " | ".join(html.escape(json.dumps(v)) for v in schema["enum"])
    t = html.escape(str(schema.get("type", "any")))
    bounds = [f"{k} {schema[k]}" for k in ("minimum", "maximum", "pattern", "maxLength") if k in schema]
    return t + (f' <span class="d">({html.escape(", ".join(map(str, bounds)))})</span>' if bounds else "")


def _body(op: dict) -> str:
    content = (op.get("requestBody") or {}).get("content") or {}
    for media, spec in content.items():
        return f"<p>body <code>{html.escape(media)}</code>: {_type(spec.get('schema', {}))}</p>"
    return ""


def render(spec: dict) -> str:
    """The page for an OpenAPI 3 document."""
    info = spec.get("info", {})
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info.get('title', 'API'))}</title>",
           f"<style>{_STYLE}</style></head><body>",
           f"<h1>{html.escape(info.get('title', 'API'))} <span class='d'>v{html.escape(str(info.get('version', '')))}</span></h1>",
           f"<p>{html.escape(info.get('description', ''))}</p>",
           "<p>The machine-readable document: <a href='/openapi.json'><code>/openapi.json</code></a>.</p>",
           "<h2>Endpoints</h2>"]
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            out.append(f"<h3><span class='m {method}'>{method.upper()}</span> <code>{html.escape(path)}</code></h3>")
            out.append(f"<p>{html.escape(op.get('summary', ''))}</p>")
            params = op.get("parameters") or []
            if params:
                out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th><th>about</th></tr>")
                for prm in params:
                    out.append(f"<tr><td><code>{html.escape(prm['name'])}</code></td><td>{html.escape(prm.get('in', ''))}</td>"
                               f"<td>{_type(prm.get('schema', {}))}</td><td>{'yes' if prm.get('required') else ''}</td>"
                               f"<td>{html.escape(prm.get('description', '') or '')}</td></tr>")
                out.append("</table>")
            out.append(_body(op))
            codes = ", ".join(f"<b>{html.escape(c)}</b> {html.escape(r.get('description', ''))}"
                              for c, r in (op.get("responses") or {}).items())
            out.append(f"<p class='d'>answers: {codes}</p>")
    out.append("<h2>Schemas</h2>")
    for name, schema in (spec.get("components", {}).get("schemas") or {}).items():
        out.append(f"<h3 id='schema-{html.escape(name)}'>{html.escape(name)}</h3>")
        if schema.get("description"):
            out.append(f"<p>{html.escape(schema['description'])}</p>")
        props = schema.get("properties") or {}
        if props:
            required = set(schema.get("required") or [])
            out.append("<table><tr><th>field</th><th>type</th><th>required</th><th>about</th></tr>")
            for field, sub in props.items():
                out.append(f"<tr><td><code>{html.escape(field)}</code></td><td>{_type(sub)}</td>"
                           f"<td>{'yes' if field in required else ''}</td>"
                           f"<td>{html.escape(sub.get('description', '') or '')}</td></tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
