"""Parse a NumPy-style index string ("0:10, [1, 3, 5], ..., None") into a Python index."""

from __future__ import annotations

import ast

from tensorslice.core.errors import InvalidSelection

__all__ = ["parse_index"]


def parse_index(text: str) -> tuple[object, ...]:
    """The index a string denotes: ints, ranges (``a:b:c``), lists (nested, of ints or
    bools), ``...`` and ``None``, separated by commas. Nothing is evaluated."""
    text = text.strip()
    if not text:
        return ()
    try:
        tree = ast.parse(f"_[{text}]", mode="eval")
    except SyntaxError as exc:
        raise InvalidSelection(f"cannot parse index {text!r}: {exc.msg}") from None
    node = tree.body
    assert isinstance(node, ast.Subscript)
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    return tuple(_item(n, text) for n in items)


def _item(node: ast.expr, text: str) -> object:
    if isinstance(node, ast.Slice):
        return slice(*(None if p is None else _int(p, text) for p in (node.lower, node.upper,
                                                                       node.step)))
    if isinstance(node, ast.List):
        return [_item(e, text) for e in node.elts]
    if isinstance(node, ast.Constant) and (node.value is None or node.value is Ellipsis
                                           or isinstance(node.value, bool)):
        return node.value
    return _int(node, text)


def _int(node: ast.expr, text: str) -> int:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_int(node.operand, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(
        node.value, bool
    ):
        return node.value
    raise InvalidSelection(
        f"cannot parse index {text!r}: {ast.unparse(node)!r} is not an integer, range, "
        f"list, ... or None"
    )
