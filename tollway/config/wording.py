"""Configuration errors in Tollway's words: pydantic's messages rephrased for a YAML author, and
"did you mean" suggestions for misspelt fields, plugin names and references.

pydantic says "Input should be a valid integer, unable to parse string as an integer"; a user who wrote
`minute: five` wants to read "must be a whole number, not 'five'".
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

# pydantic error type -> message; {input} and the error's ctx fields are filled in.
_MESSAGES = {
    "int_parsing": "must be a whole number, not {input!r}",
    "int_type": "must be a whole number, not {kind}",
    "int_from_float": "must be a whole number, not {input!r}",
    "float_parsing": "must be a number, not {input!r}",
    "float_type": "must be a number, not {kind}",
    "bool_parsing": "must be true or false, not {input!r}",
    "bool_type": "must be true or false, not {kind}",
    "string_type": "must be a string, not {kind}",
    "list_type": "must be a list (YAML `- item` lines or [a, b]), not {kind}",
    "dict_type": "must be a mapping (YAML `key: value` lines), not {kind}",
    "model_type": "must be a mapping (YAML `key: value` lines), not {kind}",
    "model_attributes_type": "must be a mapping (YAML `key: value` lines), not {kind}",
    "greater_than": "must be more than {gt}, not {input!r}",
    "greater_than_equal": "must be at least {ge}, not {input!r}",
    "less_than": "must be less than {lt}, not {input!r}",
    "less_than_equal": "must be at most {le}, not {input!r}",
    "literal_error": "must be one of {expected}, not {input!r}",
    "enum": "must be one of {expected}, not {input!r}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_long": "must be at most {max_length} characters long",
    "missing": "required field is missing",
}


def message(err: Any, model: type[BaseModel] | None = None) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as a sentence for the config's author;
    `model` is the model that was validated, for suggesting the field an unknown one was meant to be."""
    kind = err["type"]
    if kind == "extra_forbidden":
        loc = err["loc"]
        known = fields_at(model, loc[:-1]) if model is not None and loc else []
        return "unknown field" + did_you_mean(str(loc[-1]) if loc else "", known, "(check its spelling)")
    if kind == "too_short" and (err.get("ctx") or {}).get("min_length") == 1:
        return "must not be empty"
    if kind == "string_too_short":
        minimum = (err.get("ctx") or {}).get("min_length", 1)
        return "must not be empty" if minimum == 1 else f"must be at least {minimum} characters long"
    template = _MESSAGES.get(kind)
    if template is not None:
        ctx = {k: _number(v) for k, v in (err.get("ctx") or {}).items()}
        fields = {"input": err.get("input"), "kind": _kind(err.get("input")), **ctx}
        try:
            text = template.format(**fields)
        except (KeyError, IndexError, ValueError):
            text = ""
        if text:
            if kind in ("literal_error", "enum"):
                text += did_you_mean(str(err.get("input")), _quoted(fields.get("expected", "")))
            return text
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def did_you_mean(word: str, candidates: Iterable[str], otherwise: str = "") -> str:
    """' (did you mean "route"?)' when one candidate is close to `word`, else `otherwise` (spaced)."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if close:
        return f' (did you mean "{close[0]}"?)'
    return f" {otherwise}" if otherwise else ""


def fields_at(model: type[BaseModel], loc: Iterable[str | int]) -> list[str]:
    """Field names (and aliases) of the model(s) a pydantic error location points into."""
    current: list[Any] = [model]
    for key in loc:
        current = _step(current, key) or current  # a key matching nothing is a union tag: stay
    names: list[str] = []
    for candidate in _expand(current):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            for name, info in candidate.model_fields.items():
                names.append(info.alias or name)
    return names


def _step(current: list[Any], key: str | int) -> list[Any]:
    out: list[Any] = []
    for tp in _expand(current):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(key, int) and origin in (list, tuple, set, frozenset) and args:
            out.append(args[0])
        elif isinstance(key, str) and origin is dict and len(args) == 2:
            out.append(args[1])
        elif isinstance(key, str) and isinstance(tp, type) and issubclass(tp, BaseModel):
            if key == tp.__name__:
                out.append(tp)
                continue
            for name, info in tp.model_fields.items():
                if key in (name, info.alias):
                    out.append(info.annotation)
    return out


def _expand(types_: list[Any]) -> list[Any]:
    """Unwrap Annotated and unions (Optional included) down to their members."""
    out: list[Any] = []
    for tp in types_:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            out += _expand([typing.get_args(tp)[0]])
        elif origin in (typing.Union, types.UnionType):
            out += _expand(list(typing.get_args(tp)))
        else:
            out.append(tp)
    return out


def _number(value: Any) -> Any:
    """100.0 in a bound reads 100."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _kind(value: Any) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    return repr(value)


def _quoted(expected: Any) -> list[str]:
    """pydantic's "'a', 'b' or 'c'" back into ["a", "b", "c"]."""
    text = str(expected).replace(" or ", ", ")
    return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
