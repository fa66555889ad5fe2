"""Every error fgplugin raises on bad input names the item and the cause."""

from __future__ import annotations


class FgpluginError(Exception):
    """Base class: a user-facing error whose message is safe to print as is."""


class SchemaError(FgpluginError):
    """The attribute schema file is malformed."""


class UnknownAttributeError(FgpluginError, KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = list(known)
        super().__init__(f"unknown attribute {name!r}; known attributes: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class CatalogError(FgpluginError):
    """One or more catalog rows are invalid. ``problems`` lists them all, not just the first."""

    def __init__(self, problems: list["Problem"]):  # noqa: F821 (defined in catalog.py)
        self.problems = list(problems)
        head = "; ".join(str(p) for p in self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"{len(self.problems)} catalog problem(s): {head}{more}")


class ImageError(FgpluginError):
    """An image could not be read: missing, corrupt, too large, bad URL, timeout."""

    def __init__(self, source: str, cause: str, *, kind: str = "image"):
        self.source = source
        self.cause = cause
        self.kind = kind
        super().__init__(f"{source}: {cause}")


class ModelCardError(FgpluginError):
    """An export or checkpoint does not fit the schema or version it is used with."""


class StoreError(FgpluginError):
    """A store is unreachable or refused a request."""


class QueryError(FgpluginError):
    """A query is malformed: bad filter syntax, negative weight, unknown id, wrong vector size."""


class OutputError(FgpluginError):
    """An output file cannot be written: it is a directory, its folder cannot be created, no permission."""


class SettingError(FgpluginError):
    """A setting or secret cannot be read: a missing or empty token file, both forms of one option given."""
