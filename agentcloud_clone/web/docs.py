"""The API's own description: `openapi.yaml` as served, and a browsable page rendered from it on the server.

The page needs no script and no CDN: every operation, parameter, body and response is laid out by Jinja from
the parsed YAML, so it works offline and under the app's `script-src 'self'` policy.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Response, render_template
from markupsafe import Markup, escape

from ..config import PROJECT_ROOT

bp = Blueprint("docs", __name__)

SPEC_PATH = PROJECT_ROOT / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "patch")

Label = list[tuple[str, str | None]]  # text pieces, each with the anchor it links to (or None)


def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    """The parsed OpenAPI document; re-read whenever the file changes."""
    return _parse(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parse(path: Path, mtime_ns: int) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return spec


@bp.get("/openapi.yaml")
def openapi_yaml() -> Response:
    """The OpenAPI document exactly as it is in the project root."""
    return Response(SPEC_PATH.read_bytes(), mimetype="application/yaml")


@bp.get("/docs")
def docs_page() -> Any:
    """Every operation grouped by tag, with its parameters, request body, responses and the schemas."""
    return render_template("docs.html", **docs_view(load_spec()))


# --- turning the document into what the page shows ------------------------------------------------------


def docs_view(spec: dict[str, Any]) -> dict[str, Any]:
    """The page's data: info, tags with their operations, the webhooks this service sends, security schemes and
    component schemas."""
    tags = {t["name"]: {**t, "description": prose(t.get("description")), "operations": []} for t in spec["tags"]}
    default_security = spec.get("security", [])
    for path, item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                operation = _operation(spec, path, method, item[method], default_security)
                for tag in item[method].get("tags") or ["other"]:
                    tags.setdefault(tag, {"name": tag, "description": "", "operations": []})
                    tags[tag]["operations"].append(operation)
    schemes = spec.get("components", {}).get("securitySchemes", {})
    return {
        "info": {**spec["info"], "description": prose(spec["info"].get("description"))},
        "openapi_version": spec["openapi"],
        "tags": [t for t in tags.values() if t["operations"]],
        # OpenAPI 3.1's top-level `webhooks`: requests this service makes, keyed by the event they announce.
        "webhooks": [
            {**_operation(spec, name, method, item[method], []), "webhook": True}
            for name, item in spec.get("webhooks", {}).items()
            for method in HTTP_METHODS
            if method in item
        ],
        "security_schemes": [
            {"name": name, "summary": _inline(_scheme_summary(s)), "description": prose(s.get("description"))}
            for name, s in schemes.items()
        ],
        "schemas": [_schema_entry(name, s) for name, s in spec.get("components", {}).get("schemas", {}).items()],
    }


def _resolve(spec: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (components only) to what it names."""
    while isinstance(obj, dict) and "$ref" in obj:
        node: Any = spec
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def _operation(
    spec: dict[str, Any], path: str, method: str, op: dict[str, Any], default_security: list[dict[str, Any]]
) -> dict[str, Any]:
    parameters = [_resolve(spec, p) for p in op.get("parameters", [])]
    body = _resolve(spec, op["requestBody"]) if "requestBody" in op else None
    security = op.get("security", default_security)
    operation_id = op.get("operationId") or re.sub(r"\W+", "-", f"{method}{path}")
    return {
        "method": method.upper(),
        "path": path,
        "operation_id": operation_id,
        "anchor": f"op-{operation_id}",
        # Earlier ids of the operation (`x-aliases`): shown beside the id, and anchors so old links still land.
        "aliases": [{"name": alias, "anchor": f"op-{alias}"} for alias in op.get("x-aliases", [])],
        "summary": op.get("summary", ""),
        "description": prose(op.get("description")),
        "security": [" + ".join(requirement) or "none" for requirement in security] or ["none"],
        "parameters": [
            {
                "name": p["name"],
                "in": p["in"],
                "required": p.get("required", False),
                "type": schema_label(p.get("schema", {})),
                "description": prose(p.get("description")),
            }
            for p in parameters
        ],
        "request_body": None
        if body is None
        else {
            "required": body.get("required", False),
            "description": prose(body.get("description")),
            "media": [_media(name, media) for name, media in body.get("content", {}).items()],
        },
        "responses": [
            _response(code, _resolve(spec, response)) for code, response in sorted(op.get("responses", {}).items())
        ],
    }


def _response(code: str, response: dict[str, Any]) -> dict[str, Any]:
    return {
        "code": code,
        "description": prose(response.get("description")),
        "headers": [
            {"name": name, "description": prose(header.get("description"))}
            for name, header in response.get("headers", {}).items()
        ],
        "media": [_media(name, media) for name, media in response.get("content", {}).items()],
        "links": [
            {"name": name, "target": link.get("operationId", ""), "description": link.get("description", "")}
            for name, link in response.get("links", {}).items()
        ],
    }


def _media(media_type: str, media: dict[str, Any]) -> dict[str, Any]:
    examples = media.get("examples") or ({"example": {"value": media["example"]}} if "example" in media else {})
    return {
        "type": media_type,
        "schema": schema_label(media.get("schema", {})),
        "examples": [
            {"name": name, "summary": ex.get("summary", ""), "text": _dump(ex.get("value"))}
            for name, ex in examples.items()
        ],
    }


def _dump(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False).strip()


def schema_label(schema: dict[str, Any]) -> Label:
    """A short human description of a schema, with links to the component schemas it names."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return [(name, f"schema-{name}")]
    for keyword, joiner in (("allOf", " & "), ("anyOf", " | "), ("oneOf", " | ")):
        if keyword in schema:
            label: Label = []
            for index, part in enumerate(schema[keyword]):
                if index:
                    label.append((joiner, None))
                label.extend(schema_label(part))
            return _nullable(schema, label)
    kind = schema.get("type", "any")
    if isinstance(kind, list):  # OpenAPI 3.1: `type: [string, "null"]`
        kinds = [k for k in kind if k != "null"]
        kind = " | ".join(kinds) if kinds else "null"
    if kind == "array":
        return _nullable(schema, [("array of ", None), *schema_label(schema.get("items", {}))])
    details = []
    if "enum" in schema:
        details.append(" | ".join(_scalar(v) for v in schema["enum"] if v is not None))
    if "format" in schema:
        details.append(schema["format"])
    if "pattern" in schema:
        details.append(f"matching {schema['pattern']}")
    details.extend(_bounds(schema))
    if "default" in schema:
        details.append(f"default {_scalar(schema['default'])}")
    text = f"{kind} ({', '.join(details)})" if details else kind
    return _nullable(schema, [(text, None)])


def _nullable(schema: dict[str, Any], label: Label) -> Label:
    kind = schema.get("type")
    nullable = schema.get("nullable") or (isinstance(kind, list) and "null" in kind and kind != ["null"])
    return [*label, (" or null", None)] if nullable else label


def _bounds(schema: dict[str, Any]) -> list[str]:
    pairs = (("minimum", "≥ {}"), ("maximum", "≤ {}"), ("minLength", "length ≥ {}"), ("maxLength", "length ≤ {}"))
    return [template.format(schema[key]) for key, template in pairs if key in schema]


def _scalar(value: Any) -> str:
    if value is True or value is False:
        return str(value).lower()
    return "null" if value is None else str(value)


def _schema_entry(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    parts = schema.get("allOf", [schema])
    required = {field for part in parts for field in part.get("required", [])}
    properties = [
        {
            "name": field,
            "type": schema_label(prop),
            "required": field in required,
            "description": prose(prop.get("description")),
        }
        for part in parts
        for field, prop in part.get("properties", {}).items()
    ]
    return {
        "name": name,
        "anchor": f"schema-{name}",
        "description": prose(schema.get("description")),
        "type": schema_label(schema) if not properties or "allOf" in schema else [("object", None)],
        "properties": properties,
        "closed": schema.get("additionalProperties") is False,
    }


def _scheme_summary(scheme: dict[str, Any]) -> str:
    if scheme.get("type") == "http":
        return f"HTTP {scheme.get('scheme', '')} ({scheme.get('bearerFormat', 'token')})".strip()
    if scheme.get("type") == "apiKey":
        return f"{scheme.get('in', '')} `{scheme.get('name', '')}`"
    return str(scheme.get("type", ""))


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> Markup:
    html = str(escape(text))
    html = _CODE.sub(r"<code>\1</code>", html)
    return Markup(_BOLD.sub(r"<strong>\1</strong>", html))  # built from escaped text only


def prose(text: str | None) -> Markup:
    """The small Markdown subset the document uses (paragraphs, `*` lists, code and bold) as safe HTML."""
    if not text:
        return Markup("")
    blocks: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines()]
        if lines[0].startswith("* "):
            items: list[str] = []
            for line in lines:
                if line.startswith("* "):
                    items.append(line[2:])
                elif items:
                    items[-1] += " " + line
            blocks.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
        else:
            blocks.append(f"<p>{_inline(' '.join(lines))}</p>")
    return Markup("".join(blocks))  # every piece went through escape()
