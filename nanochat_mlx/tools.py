"""The engine's calculator tool, evaluated by walking an allow-listed AST instead of calling eval.

Mirrors nanochat's ``use_calculator``: the same character filters, the same rejected patterns and
Python's own arithmetic and ``str()`` formatting, so a model trained against the reference sees the
same tool outputs. The only differences are deliberate refusals (``None``) for inputs the
reference would have handed to ``eval``: anything outside plain arithmetic or a single
``"text".count("x")`` call, and inputs too long or too large to evaluate cheaply.
"""

from __future__ import annotations

import ast
import operator
import warnings
from collections.abc import Callable

# Bounds that replace the reference's 3-second alarm: each step below is then cheap.
MAX_EXPR_CHARS = 1000
# Well under CPython's 4300-digit int->str limit (~14_000 bits), so str() of a result never fails.
MAX_INT_BITS = 10_000

_MATH_CHARS = frozenset("0123456789*+-/.() ")
_TEXT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
# The reference's deny-list, kept so that exactly the same texts reach the evaluator.
_DANGEROUS = (
    "__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
    "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr",
)  # fmt: skip

Number = int | float

# Only the operators the arithmetic character set can spell (``**`` is rejected before parsing).
_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def use_calculator(expr: str) -> str | None:
    """Evaluate a calculator tool call as the reference does; the str() of the result, or None."""
    expr = expr.replace(",", "")
    if len(expr) > MAX_EXPR_CHARS:
        return None
    value: Number | None
    if all(c in _MATH_CHARS for c in expr):
        if "**" in expr:  # the reference forbids powers: they are the easy way to huge numbers
            return None
        tree = _parse(expr)
        value = None if tree is None else _eval_arithmetic(tree)
    elif all(c in _TEXT_CHARS for c in expr) and not any(p in expr.lower() for p in _DANGEROUS) and ".count(" in expr:
        tree = _parse(expr)
        value = None if tree is None else _eval_count(tree)
    else:
        return None
    return None if value is None else str(value)


def _parse(expr: str) -> ast.expr | None:
    """Parse to an AST only (nothing is compiled to code), or None if it is not an expression."""
    try:
        with warnings.catch_warnings():
            # The reference hides SyntaxWarnings (e.g. "invalid decimal literal") the same way.
            warnings.simplefilter("ignore")
            # eval() skips leading blanks but ast.parse calls them an indent.
            return ast.parse(expr.lstrip(" "), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _number(node: ast.expr) -> Number | None:
    """The value of an int or float literal (not bool, complex or Ellipsis), else None."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value: Number = node.value
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            return None
        return value
    return None


def _apply(op: ast.operator, left: Number, right: Number) -> Number | None:
    """Python's own arithmetic, refusing int results beyond MAX_INT_BITS and errors (e.g. 1/0)."""
    # Check before multiplying: a product has at least (a + b - 1) bits for a- and b-bit factors.
    if (
        isinstance(op, ast.Mult)
        and isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1
    ):
        return None
    try:
        result = _BINARY[type(op)](left, right)
    except ArithmeticError:  # ZeroDivisionError, or OverflowError from int -> float
        return None
    if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
        return None
    return result


def _eval_arithmetic(tree: ast.expr) -> Number | None:
    """Evaluate numbers, + - * / // and unary +/-; any other node makes the result None."""
    # An explicit stack instead of recursion: "-" * 999 + "1" parses into a tree deeper than
    # Python's recursion limit, and the length limit already bounds the node count.
    pending: list[tuple[ast.expr, bool]] = [(tree, False)]
    values: list[Number] = []
    while pending:
        node, children_done = pending.pop()
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            if children_done:
                values.append(_UNARY[type(node.op)](values.pop()))
            else:
                pending += [(node, True), (node.operand, False)]
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            if children_done:
                right, left = values.pop(), values.pop()
                result = _apply(node.op, left, right)
                if result is None:
                    return None
                values.append(result)
            else:  # left is popped, and so evaluated, first
                pending += [(node, True), (node.right, False), (node.left, False)]
        else:
            number = _number(node)
            if number is None:
                return None
            values.append(number)
    return values[0]


def _eval_count(tree: ast.expr) -> int | None:
    """Evaluate exactly ``"text".count("sub")`` on two str literals, else None."""
    # One argument only: commas are stripped before parsing, so start/end can never be passed.
    if (
        isinstance(tree, ast.Call)
        and not tree.keywords
        and len(tree.args) == 1
        and isinstance(tree.func, ast.Attribute)
        and tree.func.attr == "count"
    ):
        text, sub = tree.func.value, tree.args[0]
        if (
            isinstance(text, ast.Constant)
            and type(text.value) is str
            and isinstance(sub, ast.Constant)
            and type(sub.value) is str
        ):
            return text.value.count(sub.value)
    return None
