"""Marshmallow schemas: what requests may carry in, and how documents are shown out. They never query."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, post_load, validate
from marshmallow.experimental.context import Context

from .ids import parse_object_id
from .vocabulary import (
    CANCEL_SOURCES,
    END_REASONS,
    LIVE_STATUSES,
    MAX_CANCEL_REASON,
    ON_BUSY,
    RUNNER_NAMES,
    SHARING_MODES,
    STATUSES,
    OnBusy,
    Runner,
    SharingMode,
    Status,
)

MASKED_SECRET = "********"


class ObjectIdField(fields.Field[ObjectId]):
    """An ObjectId given as 24 lowercase hex characters; anything else (objects, numbers, `$ne`) is refused."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> ObjectId:
        oid = parse_object_id(value)
        if oid is None:
            raise ValidationError("Must be an id of 24 hexadecimal characters.")
        return oid

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(value)


# JSON nests at most this deep, in a body and in the settings a form spells as JSON text: far more than any request
# needs, far less than what would exhaust the parser's recursion or MongoDB's nesting limit (100).
MAX_JSON_DEPTH = 32
INT64_RANGE = range(-(2**63), 2**63)


def _is_text(value: str) -> bool:
    """Whether `value` is Unicode text that UTF-8 (and so BSON) can hold: JSON's \\ud800 escapes spell lone
    surrogates, which it cannot."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH, *, storable: bool = False) -> str | None:
    """What is wrong with a parsed JSON value, or None: nesting deeper than `max_depth`, or text that is not
    Unicode; with `storable`, also what MongoDB cannot store as given (a key it would read as an operator or
    cannot hold, an integer beyond 64 bits). Checked without recursion, so no nesting exhausts the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list) and depth > max_depth:
            return f"nested more than {max_depth} levels deep"
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str) or not _is_text(key):
                    return "keys must be Unicode text"
                if storable and (key.startswith("$") or "." in key or "\x00" in key):
                    return f"key {key!r} is not allowed: keys may not start with '$' or contain '.' or NUL"
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            if not _is_text(item):
                return "text must be Unicode (a lone surrogate such as \\ud800 is not)"
        elif storable and isinstance(item, int) and not isinstance(item, bool) and item not in INT64_RANGE:
            return "integers must fit in 64 bits"
    return None


class QueryInteger(fields.Integer):
    """An integer in a query string: ASCII digits only (`int()` would also take other scripts' digits)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str) and not (value.isascii() and value.lstrip("-").isdigit()):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


# True while an HTML form is loaded: its values are all text, where JSON values carry their own types.
FormInput = Context[bool]


class JsonNumber(fields.Float):
    """A JSON number. Numeric text (`"5"`) and booleans are refused: these values always come typed, from a JSON
    body or from JSON text in a form field."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.make_error("invalid")
        return float(super()._deserialize(value, attr, data, **kwargs))


class JsonInteger(fields.Integer):
    """A JSON integer: a whole number (`5`, or `5.0`, which JSON Schema counts as one too). Numeric text, booleans
    and fractions are refused, where marshmallow's Integer would take `"5"` and cut `5.5` to `5`."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            raise self.make_error("invalid")
        return int(super()._deserialize(int(value), attr, data, **kwargs))


class FormBoolean(fields.Boolean):
    """A JSON `true`/`false`; from an HTML form, the text a checkbox sends (`on`, `true`, ...). `0` is not one."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, bool):
            return value
        if not (isinstance(value, str) and FormInput.get(False)):
            raise self.make_error("invalid")
        return bool(super()._deserialize(value, attr, data, **kwargs))


class JsonObjectField(fields.Field[dict[str, Any]]):
    """A JSON object, given as an object (JSON clients) or as JSON text (HTML forms, whose values are all text)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(value, str) and FormInput.get(False):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise ValidationError(f"Must be a JSON object (nested at most {MAX_JSON_DEPTH} levels).") from None
        if not isinstance(value, dict):
            raise ValidationError("Must be a JSON object.")
        problem = json_problem(value, storable=True)
        if problem is not None:
            raise ValidationError(f"Not storable: {problem}.")
        return value


class Strict(Schema):
    """Base for request schemas: unknown fields are an error, not silently dropped."""

    class Meta:
        unknown = RAISE


NAME = fields.String(validate=validate.Length(min=1, max=200))


# --- requests -------------------------------------------------------------------------------------------


class LoginSchema(Strict):
    email = fields.Email(required=True, validate=validate.Length(max=320))
    password = fields.String(required=True, validate=validate.Length(min=1, max=1024))
    next = fields.String(load_default=None, validate=validate.Length(max=2000))
    remember = FormBoolean(load_default=False)


class PasswordChangeSchema(Strict):
    currentPassword = fields.String(required=True, validate=validate.Length(min=1, max=1024))
    newPassword = fields.String(required=True, validate=validate.Length(min=1, max=1024))


DAY = 86400


class LimitsSchema(Strict):
    """Limits that end a session for its team (per app, with team defaults); unset means no limit."""

    queueTtl = JsonNumber(allow_none=True, validate=validate.Range(min=1, max=7 * DAY))
    maxTurnSeconds = JsonNumber(allow_none=True, validate=validate.Range(min=1, max=7 * DAY))
    idleTimeout = JsonNumber(allow_none=True, validate=validate.Range(min=1, max=90 * DAY))
    tokenBudget = JsonInteger(allow_none=True, validate=validate.Range(min=1, max=10**9))


class LimitsField(JsonObjectField):
    """Limits given as an object (JSON clients) or as JSON text (HTML forms); unset ones are dropped."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        loaded: dict[str, Any] = LimitsSchema().load(super()._deserialize(value, attr, data, **kwargs))
        return {key: item for key, item in loaded.items() if item is not None}


# A session's variables (Agentcloud's `variables`, set by the edit route): names safe as MongoDB keys and in
# templates, and bounded so a session document stays small (it is read on every poll).
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,99}")
MAX_VARIABLES = 50
MAX_VARIABLE_CHARS = 10_000
MAX_VARIABLES_TOTAL_CHARS = 100_000
VARIABLE_NAME_RULE = "Names are 1 to 100 letters, digits, '_' or '-', starting with a letter or '_'."


class VariablesField(JsonObjectField):
    """An object of string → string (or JSON text of one, from HTML forms), within the bounds above."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        variables = super()._deserialize(value, attr, data, **kwargs)
        if len(variables) > MAX_VARIABLES:
            raise ValidationError(f"At most {MAX_VARIABLES} variables.")
        problems: dict[str, list[str]] = {}
        for name, text in variables.items():
            shown = name[:100]
            if not VARIABLE_NAME.fullmatch(name):
                problems[shown] = [VARIABLE_NAME_RULE]
            elif not isinstance(text, str):
                problems[shown] = ["Must be a string."]
            elif len(text) > MAX_VARIABLE_CHARS:
                problems[shown] = [f"At most {MAX_VARIABLE_CHARS} characters."]
        if problems:
            raise ValidationError(problems)
        if sum(len(text) for text in variables.values()) > MAX_VARIABLES_TOTAL_CHARS:
            raise ValidationError(f"At most {MAX_VARIABLES_TOTAL_CHARS} characters in all.")
        return dict(variables)


class VariableNamesField(fields.List[str]):
    """The variables an app needs before its sessions run (names as for VariablesField, each once)."""

    def __init__(self, **kwargs: Any) -> None:
        name = fields.String(validate=validate.Regexp(VARIABLE_NAME, error=VARIABLE_NAME_RULE))
        super().__init__(name, validate=validate.Length(max=MAX_VARIABLES), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[Any]:
        if isinstance(value, str) and FormInput.get(False):  # an HTML form: names separated by commas
            value = [item.strip() for item in value.split(",") if item.strip()]
        names = super()._deserialize(value, attr, data, **kwargs)
        return list(dict.fromkeys(names))


MAX_WHITELIST = 100


class SharingConfigSchema(Strict):
    """Agentcloud's `sharingConfig`: the mode, and for `whitelist` the accounts it names (ids or emails). Its
    `permissions` object (account id → permission) is taken as more whitelist entries."""

    mode = fields.String(required=True, validate=validate.OneOf(SHARING_MODES))
    whitelist = fields.List(
        fields.String(validate=validate.Length(min=1, max=320)),
        load_default=list,
        validate=validate.Length(max=MAX_WHITELIST),
    )
    permissions = fields.Dict(keys=fields.String(), load_default=dict, validate=validate.Length(max=MAX_WHITELIST))

    @post_load
    def _normalised(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        entries: list[Any] = []
        problems: dict[str, list[str]] = {}
        email = fields.Email()
        for raw in [*data["whitelist"], *data["permissions"]]:
            entry: Any = parse_object_id(raw)
            if entry is None:
                try:
                    entry = email.deserialize(raw).strip().lower()
                except ValidationError:
                    problems[raw[:320]] = ["Must be an account id or an email address."]
                    continue
            if entry not in entries:
                entries.append(entry)
        if problems:
            raise ValidationError({"whitelist": problems})
        if len(entries) > MAX_WHITELIST:
            raise ValidationError({"whitelist": [f"At most {MAX_WHITELIST} accounts."]})
        return {"mode": data["mode"], "whitelist": entries}


class SharingConfigField(JsonObjectField):
    """`sharingConfig` given as an object (JSON clients) or as JSON text (HTML forms)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        loaded: dict[str, Any] = SharingConfigSchema().load(super()._deserialize(value, attr, data, **kwargs))
        return loaded


class AppCreateSchema(Strict):
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    runner = fields.String(load_default=Runner.SCRIPTED.value, validate=validate.OneOf(RUNNER_NAMES))
    config = JsonObjectField(load_default=dict)
    limits = LimitsField(load_default=dict)
    sharingConfig = SharingConfigField(load_default=None)
    requiredVariables = VariableNamesField(load_default=list)


class AppEditSchema(Strict):
    name = fields.String(validate=validate.Length(min=1, max=200))
    runner = fields.String(validate=validate.OneOf(RUNNER_NAMES))
    config = JsonObjectField()
    limits = LimitsField()
    sharingConfig = SharingConfigField()
    requiredVariables = VariableNamesField()


class TeamEditSchema(Strict):
    name = fields.String(validate=validate.Length(min=1, max=200))
    limits = LimitsField()


CsrfEcho = fields.String(load_default=None, validate=validate.Length(max=500))


def _one_app_id(data: dict[str, Any]) -> None:
    """Agentcloud's client names the app `id`, its docs `appId`: either, or both when they are equal."""
    ids = {data.pop(key) for key in ("appId", "id") if data.get(key) is not None}
    if not ids:
        raise ValidationError({"appId": ["Missing data for required field (`appId`, or Agentcloud's `id`)."]})
    if len(ids) > 1:
        raise ValidationError({"appId": ["`appId` and `id` name different apps; give one, or the same one."]})
    data["appId"] = ids.pop()


def _tidy_start(data: dict[str, Any]) -> dict[str, Any]:
    data.pop("_csrf", None)
    for key in ("name", "message"):
        if isinstance(data.get(key), str) and not data[key].strip():
            data[key] = None
    return data


class SessionCreateSchema(Strict):
    """Start a session. Agentcloud's client sends `{id, skipRun?}` (and its `_csrf` and `resourceSlug`)."""

    appId = ObjectIdField()
    id = ObjectIdField()
    name = fields.String(load_default=None, validate=validate.Length(max=200))
    message = fields.String(load_default=None, validate=validate.Length(max=100_000))
    # Create the session without running a turn; a first `message` is recorded and answered by `start`.
    skipRun = FormBoolean(load_default=False)
    variables = VariablesField(load_default=None)
    resourceSlug = ObjectIdField(load_default=None)
    _csrf = CsrfEcho

    @post_load
    def _normalised(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        _one_app_id(data)
        return _tidy_start(data)


class SharedSessionCreateSchema(SessionCreateSchema):
    """Start a session of a shared app: through its share link (`shareId`), or by `appId`/`id` for its team's
    members and the accounts a whitelist names."""

    shareId = fields.String(load_default=None, validate=validate.Length(min=1, max=200))

    @post_load
    def _normalised(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if data["shareId"] is not None and data.get("appId") is None and data.get("id") is None:
            data.pop("id", None)
            data["appId"] = None
        else:
            _one_app_id(data)
        return _tidy_start(data)


class SessionIdsEcho(Strict):
    """Agentcloud's UI repeats the path's ids (and its CSRF token) in the body; they must name the path's."""

    sessionId = ObjectIdField(load_default=None)
    resourceSlug = ObjectIdField(load_default=None)
    _csrf = CsrfEcho


class SessionEditSchema(SessionIdsEcho):
    """Agentcloud's session edit: only `variables`, replaced as a whole."""

    variables = VariablesField(required=True)


class SessionStartSchema(SessionIdsEcho):
    """Agentcloud's session start: nothing but the echoed ids."""


class SendMessageSchema(Strict):
    """The next message; Agentcloud's own client sends it as `messageText`."""

    message = fields.String(validate=validate.Length(min=1, max=100_000))
    messageText = fields.String(validate=validate.Length(min=1, max=100_000))
    onBusy = fields.String(load_default=OnBusy.REJECT.value, validate=validate.OneOf(ON_BUSY))
    _csrf = CsrfEcho

    @post_load
    def _one_message(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data.pop("_csrf", None)
        texts = {data.pop(key) for key in ("message", "messageText") if key in data}
        if len(texts) != 1:
            message = "Give the message as `message` (or `messageText`), once."
            raise ValidationError({"message": [message]})
        data["message"] = texts.pop()
        return data


CancelReason = fields.String(load_default=None, validate=validate.Length(max=MAX_CANCEL_REASON))


class CancelSchema(Strict):
    """Agentcloud's cancel body: its UI repeats the path's ids (and a CSRF field) in the body."""

    reason = CancelReason
    next = fields.String(load_default=None, validate=validate.Length(max=2000))
    sessionId = ObjectIdField(load_default=None)
    resourceSlug = ObjectIdField(load_default=None)
    _csrf = fields.String(load_default=None, validate=validate.Length(max=500))


class BulkCancelSchema(Strict):
    """Which of a team's live sessions to cancel: by ids, by filter, or every one (`all`); `dryRun` only counts."""

    ids = fields.List(ObjectIdField(), validate=validate.Length(min=1, max=1000))
    status = fields.String(validate=validate.OneOf([s.value for s in Status if s.value in LIVE_STATUSES]))
    appId = ObjectIdField()
    createdBy = ObjectIdField()
    # Compared through ObjectIds, whose timestamps run from 1970 to early 2106.
    createdBefore = fields.AwareDateTime(
        default_timezone=UTC,
        validate=validate.Range(min=datetime(1970, 1, 1, tzinfo=UTC), max=datetime(2106, 1, 1, tzinfo=UTC)),
    )
    all = FormBoolean()
    reason = CancelReason
    dryRun = FormBoolean(load_default=False)

    @post_load
    def _some_criterion(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        criteria = {key: data[key] for key in ("ids", "status", "appId", "createdBy", "createdBefore") if key in data}
        if not criteria and not data.get("all"):
            raise ValidationError(
                {"ids": ["Give ids, a filter (status, appId, createdBy, createdBefore) or all: true."]}
            )
        return {"criteria": criteria, "reason": data["reason"], "dryRun": data["dryRun"]}


class ManagedBulkCancelSchema(BulkCancelSchema):
    teamId = ObjectIdField(required=True)

    @post_load
    def _some_criterion(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        team_id = data.pop("teamId")
        return {**super()._some_criterion(data, **kwargs), "teamId": team_id}


class ManagedCancelSchema(Strict):
    sessionId = ObjectIdField(required=True)
    reason = CancelReason


class ApiKeyCreateSchema(Strict):
    name = fields.String(load_default="API key", validate=validate.Length(min=1, max=200))


class CursorField(fields.Field[ObjectId | None]):
    """A keyset cursor in a query string: an id, or Agentcloud's `null` for none."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> ObjectId | None:
        if value == "null":
            return None
        oid = parse_object_id(value)
        if oid is None:
            raise ValidationError("Must be an id of 24 hexadecimal characters (or `null` for none).")
        return oid


class ListSessionsArgs(Schema):
    class Meta:
        unknown = EXCLUDE

    before = CursorField(load_default=None)
    limit = QueryInteger(load_default=10, validate=validate.Range(min=1, max=100))
    status = fields.String(load_default=None, validate=validate.OneOf(STATUSES))


class ListEventsArgs(Schema):
    class Meta:
        unknown = EXCLUDE

    # MongoDB integers are 8 bytes; anything larger could never match and would not encode.
    after = QueryInteger(load_default=0, validate=validate.Range(min=0, max=2**63 - 1))
    limit = QueryInteger(load_default=500, validate=validate.Range(min=1, max=1000))


class MessagesArgs(ListEventsArgs):
    """Agentcloud's transcript polling: `?messageId=<id>` (a transcript event's `_id`) as well as `?after=<seq>`."""

    messageId = ObjectIdField(load_default=None)

    @post_load(pass_original=True)
    def _one_cursor(self, data: dict[str, Any], original: Any, **kwargs: Any) -> dict[str, Any]:
        if data["messageId"] is not None and "after" in (original or {}):
            raise ValidationError({"messageId": ["Give one cursor: `after` or `messageId`."]})
        return data


# --- runner settings --------------------------------------------------------------------------------------


class ScriptedRunnerConfig(Strict):
    """The built-in deterministic agent: streams `steps` pieces, `stepDelay` seconds apart."""

    steps = JsonInteger(load_default=8, validate=validate.Range(min=1, max=1_000_000))
    stepDelay = JsonNumber(load_default=0.25, validate=validate.Range(min=0, max=60))
    reply = fields.String(load_default=None, validate=validate.Length(max=10_000))
    endAfterTurns = JsonInteger(load_default=None, validate=validate.Range(min=1, max=10_000))
    failAtStep = JsonInteger(load_default=None, validate=validate.Range(min=1, max=10_000))


# An http(s) URL of ASCII: a host name or [IPv6 address], an optional port, then any visible characters. openapi.yaml
# states the same pattern, so what the spec calls valid is exactly what is accepted.
BASE_URL = (
    r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)"
    r"(:[0-9]{1,5})?([/?#][!-~]*)?\Z"
)


class OpenAIRunnerConfig(Strict):
    """Any OpenAI-compatible chat-completions endpoint."""

    model = fields.String(required=True, validate=validate.Length(min=1, max=200))
    baseUrl = fields.String(load_default=None, validate=validate.Regexp(BASE_URL, error="Must be an http(s) URL."))
    apiKey = fields.String(load_default=None, validate=validate.Length(max=500))
    systemPrompt = fields.String(load_default=None, validate=validate.Length(max=20_000))
    temperature = JsonNumber(load_default=None, validate=validate.Range(min=0, max=2))
    maxTokens = JsonInteger(load_default=None, validate=validate.Range(min=1, max=1_000_000))
    timeout = JsonNumber(load_default=60.0, validate=validate.Range(min=1, max=600))


class PythonRunnerConfig(Strict):
    """A user callable `module:function` that yields output pieces."""

    callable = fields.String(
        required=True, validate=validate.Regexp(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", error="Must be module:function.")
    )
    options = JsonObjectField(load_default=dict)


RUNNER_CONFIG_SCHEMAS: dict[str, type[Schema]] = {
    Runner.SCRIPTED: ScriptedRunnerConfig,
    Runner.OPENAI: OpenAIRunnerConfig,
    Runner.PYTHON: PythonRunnerConfig,
}


def validate_runner_config(runner: str, config: dict[str, Any]) -> dict[str, Any]:
    """The runner's settings with defaults filled in; raises ValidationError under `config`."""
    try:
        loaded = RUNNER_CONFIG_SCHEMAS[runner]().load(config)
    except ValidationError as exc:
        raise ValidationError({"config": exc.messages}) from None
    return {k: v for k, v in loaded.items() if v is not None}


# --- responses -------------------------------------------------------------------------------------------


class Out(Schema):
    """Base for response schemas: ids as strings, datetimes as ISO 8601."""

    class Meta:
        unknown = EXCLUDE
        datetimeformat = "iso"


class SessionOut(Out):
    _id = ObjectIdField()
    orgId = ObjectIdField()
    teamId = ObjectIdField()
    appId = ObjectIdField()
    name = fields.String()
    status = fields.String()
    endReason = fields.String(allow_none=True)
    cancelling = fields.Boolean(dump_default=False)
    turnInFlight = fields.Boolean(dump_default=False)
    activeTurnId = ObjectIdField(allow_none=True)
    turnStartedAt = fields.DateTime(allow_none=True)
    startDate = fields.DateTime()
    lastUpdatedDate = fields.DateTime()
    endedAt = fields.DateTime(allow_none=True)
    cancelledAt = fields.DateTime(allow_none=True)
    cancelledBy = ObjectIdField(allow_none=True)
    cancellation = fields.Nested(lambda: CancellationOut(), allow_none=True)
    heartbeatAt = fields.DateTime(allow_none=True)
    tokensUsed = fields.Integer()
    previewLabel = fields.String(allow_none=True)
    createdBy = ObjectIdField(allow_none=True)
    sharingConfig = fields.Dict()
    lastSeq = fields.Integer(attribute="eventSeq", dump_default=0)
    limits = fields.Dict(dump_default=dict)
    deadline = fields.DateTime(allow_none=True)
    queued = fields.Boolean(dump_default=False)
    queuedMessages = fields.Integer(dump_default=0)
    variables = fields.Dict(dump_default=dict)
    # Variables the app needs that the session does not have yet (no turn runs until they are set).
    needsVariables = fields.List(fields.String(), dump_default=list)
    # A message was recorded without a turn (skipRun, or variables needed first); `start` answers it.
    pendingMessage = fields.Boolean(dump_default=False)


# What the shared routes show: the conversation and its state, nothing about the team (who its members are, the
# app's limits) that a visitor from outside it has no business seeing.
SHARED_SESSION_FIELDS = (
    "_id",
    "teamId",
    "appId",
    "name",
    "status",
    "endReason",
    "cancelling",
    "turnInFlight",
    "startDate",
    "lastUpdatedDate",
    "endedAt",
    "cancelledAt",
    "tokensUsed",
    "previewLabel",
    "sharingConfig",
    "lastSeq",
    "queued",
    "queuedMessages",
    "variables",
    "needsVariables",
    "pendingMessage",
)


class ActorOut(Out):
    kind = fields.String()
    accountId = ObjectIdField()
    apiKeyId = ObjectIdField()


class CancellationOut(Out):
    """Who asked for the cancel, from where, why, and when it was asked for and completed."""

    by = fields.Nested(ActorOut)
    source = fields.String(validate=validate.OneOf(CANCEL_SOURCES))
    reason = fields.String()
    endReason = fields.String(validate=validate.OneOf(END_REASONS))
    requestedAt = fields.DateTime()
    completedAt = fields.DateTime(allow_none=True)


class EventOut(Out):
    _id = ObjectIdField()
    sessionId = ObjectIdField()
    seq = fields.Integer()
    type = fields.String()
    role = fields.String()
    text = fields.String()
    turnId = fields.String()
    interrupted = fields.Boolean()
    # On a `turn_end` that hands a turn back to the queue (its worker shut down): which attempt was cut off.
    retry = fields.Integer()
    queued = fields.Boolean()
    # A stand-in for an entry lost with its writers (two in a row died between their writes): the transcript
    # keeps its gap-free `seq`, and says so.
    lost = fields.Boolean()
    by = ObjectIdField()
    status = fields.String()
    endReason = fields.String()
    source = fields.String()
    reason = fields.String()
    message = fields.String()
    tokens = fields.Integer()
    createdAt = fields.DateTime()


class AppOut(Out):
    _id = ObjectIdField()
    orgId = ObjectIdField()
    teamId = ObjectIdField()
    name = fields.String()
    runner = fields.String()
    limits = fields.Dict(dump_default=dict)
    config = fields.Method("_config")
    createdBy = ObjectIdField(allow_none=True)
    createdAt = fields.DateTime()
    updatedAt = fields.DateTime()
    sharingConfig = fields.Method("_sharing")
    # That a share link exists and since when; the link itself is shown once, when it is made.
    shareLink = fields.Method("_share_link")
    requiredVariables = fields.List(fields.String(), dump_default=list)

    def _sharing(self, obj: dict[str, Any]) -> dict[str, Any]:
        sharing = obj.get("sharingConfig") or {}
        return {
            "mode": sharing.get("mode", SharingMode.TEAM),
            "whitelist": [str(entry) for entry in sharing.get("whitelist") or []],
        }

    def _share_link(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        link = obj.get("shareLink")
        if not link:
            return None
        created = link.get("createdAt")
        return {"createdAt": created.isoformat() if isinstance(created, datetime) else created}

    def _config(self, obj: dict[str, Any]) -> dict[str, Any]:
        # An upstream API key is a secret: say that one is set, never what it is.
        config = dict(obj.get("config") or {})
        if config.get("apiKey"):
            config["apiKey"] = MASKED_SECRET
        return config


class ApiKeyOut(Out):
    _id = ObjectIdField()
    name = fields.String()
    prefix = fields.String(attribute="lookup")
    createdAt = fields.DateTime()
    lastUsedAt = fields.DateTime(allow_none=True)
    revokedAt = fields.DateTime(allow_none=True)


class TeamOut(Out):
    _id = ObjectIdField()
    orgId = ObjectIdField()
    name = fields.String()
    role = fields.String()
    limits = fields.Dict(dump_default=dict)


class MemberOut(Out):
    _id = ObjectIdField()
    email = fields.String()
    name = fields.String()
    role = fields.String()


class InvitationOut(Out):
    """A team's invitation, as its admins see it (members.json) and as its invitee sees it (account.json)."""

    _id = ObjectIdField()
    teamId = ObjectIdField()
    teamName = fields.String()
    email = fields.String()
    role = fields.String()
    invitedAt = fields.DateTime()
    expiresAt = fields.DateTime()


class OperationOut(Out):
    _id = ObjectIdField()
    teamId = ObjectIdField()
    kind = fields.String()
    status = fields.String()
    reason = fields.String(allow_none=True)
    total = fields.Integer()
    processed = fields.Integer()
    cancelled = fields.Integer()
    alreadyDone = fields.Integer()
    createdAt = fields.DateTime()
    lastUpdatedDate = fields.DateTime()
    finishedAt = fields.DateTime(allow_none=True)


class EndpointOut(Out):
    _id = ObjectIdField()
    teamId = ObjectIdField()
    url = fields.String()
    eventTypes = fields.List(fields.String())
    disabled = fields.Boolean()
    createdAt = fields.DateTime()
    updatedAt = fields.DateTime()


class AttemptOut(Out):
    at = fields.DateTime()
    statusCode = fields.Integer(allow_none=True)
    error = fields.String(allow_none=True)
    durationMs = fields.Float()


class DeliveryOut(Out):
    _id = ObjectIdField()
    endpointId = ObjectIdField()
    type = fields.String()
    status = fields.String()
    payload = fields.Dict()
    attempts = fields.List(fields.Nested(AttemptOut))
    attemptCount = fields.Integer()
    createdAt = fields.DateTime()
    deliveredAt = fields.DateTime(allow_none=True)
    nextAttemptAt = fields.DateTime(allow_none=True)


session_out = SessionOut()
endpoint_out = EndpointOut()
delivery_out = DeliveryOut()
shared_session_out = SessionOut(only=SHARED_SESSION_FIELDS)
shared_event_out = EventOut(exclude=("by",))
operation_out = OperationOut()
member_out = MemberOut()
team_invitation_out = InvitationOut(exclude=("teamName",))
my_invitation_out = InvitationOut(exclude=("email",))
event_out = EventOut()
app_out = AppOut()
api_key_out = ApiKeyOut()
team_out = TeamOut()
