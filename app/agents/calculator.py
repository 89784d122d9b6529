"""Arithmetic for the `calculator` tool, without `eval`.

The expression is parsed with `ast.parse(..., mode="eval")` and checked against a whitelist:
int/float literals, + - * / // % ** and unary + -. Hostile input fails fast with
`CalculatorError`: length, nesting, AST size and depth are capped before evaluating, powers
are refused when the exponent or the estimated result is too large, and every intermediate
int must stay within 10**300, every float finite. `^` means power, and the signs U+00D7
and U+00F7 mean * and /.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

__all__ = ["CalculatorError", "evaluate", "format_result"]

Number = int | float

MAX_LENGTH = 256
MAX_NODES = 200
MAX_DEPTH = 50
MAX_EXPONENT = 1000
MAX_DIGITS = 300
MAX_INT = 10**MAX_DIGITS


class CalculatorError(ValueError):
    """The expression is not allowed, not valid, or its result is out of bounds."""


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: lambda base, exponent: _power(base, exponent),  # bounds-checked power
}

_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}

_OPERATOR_SYMBOLS: dict[type[ast.AST], str] = {
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Not: "not",
    ast.And: "and",
    ast.Or: "or",
}

_FRIENDLY: dict[type[ast.AST], str] = {
    ast.Call: "function calls are",
    ast.Attribute: "attribute access is",
    ast.Subscript: "subscripts are",
    ast.Compare: "comparisons are",
    ast.Lambda: "lambda is",
    ast.IfExp: "conditional expressions are",
    ast.JoinedStr: "f-strings are",
    ast.FormattedValue: "f-strings are",
    ast.List: "lists are",
    ast.Tuple: "tuples are",
    ast.Set: "sets are",
    ast.Dict: "dicts are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "generator expressions are",
    ast.NamedExpr: "assignment expressions are",
    ast.Starred: "starred expressions are",
    ast.Slice: "slices are",
    ast.Await: "await is",
    ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
}

_ALLOWED_STRUCTURE = (ast.Expression, ast.operator, ast.unaryop)


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression; raise `CalculatorError` for anything else."""
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"expression is too long (max {MAX_LENGTH} characters)")
    source = expression.replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/").strip()
    if not source:
        raise CalculatorError("expression is empty")
    _check_nesting(source)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"invalid expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        # ValueError: null bytes; the others cannot happen within the bounds above, but a
        # parser failure must never escape as anything other than CalculatorError.
        raise CalculatorError("invalid expression") from None
    _check_tree(tree)
    return _eval(tree.body, 0)


def format_result(value: int | float) -> str:
    """Render a result for display: ints exactly, floats with 12 significant digits."""
    if isinstance(value, float):
        if value == 0:
            return "0"  # also hides "-0"
        return format(value, ".12g")
    return str(value)


# ---------------------------------------------------------------------------------------


def _check_nesting(source: str) -> None:
    depth = 0
    for char in source:
        if char in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise CalculatorError(f"expression is nested too deeply (max {MAX_DEPTH})")
        elif char in ")]}":
            depth -= 1


def _check_tree(tree: ast.Expression) -> None:
    """Whitelist every node before evaluating anything, and bound the tree's size."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.expr):
            count += 1
            if count > MAX_NODES:
                raise CalculatorError(f"expression is too large (max {MAX_NODES} nodes)")
        if isinstance(node, ast.Constant):
            _check_constant(node.value)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise CalculatorError(f"operator {_symbol(node.op)} is not allowed")
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                raise CalculatorError(f"operator {_symbol(node.op)} is not allowed")
        elif isinstance(node, _ALLOWED_STRUCTURE):
            continue
        else:
            raise CalculatorError(f"{_describe(node)} not allowed")


def _check_constant(value: object) -> None:
    if isinstance(value, bool):
        raise CalculatorError("booleans are not allowed")
    if isinstance(value, int):
        _check_result(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("number is out of range")
    elif isinstance(value, complex):
        raise CalculatorError("complex numbers are not allowed")
    elif isinstance(value, str):
        raise CalculatorError("strings are not allowed")
    elif isinstance(value, bytes):
        raise CalculatorError("bytes are not allowed")
    else:
        raise CalculatorError(f"{value!r} is not allowed")


def _symbol(op: ast.AST) -> str:
    return _OPERATOR_SYMBOLS.get(type(op), type(op).__name__)


def _describe(node: ast.AST) -> str:
    """'<what> is' / '<what> are', to be followed by ' not allowed'."""
    if isinstance(node, ast.Name):
        return f"name {node.id!r} is"
    if isinstance(node, ast.BoolOp):
        return f"operator {_symbol(node.op)} is"
    return _FRIENDLY.get(type(node), f"{type(node).__name__} is")


def _eval(node: ast.expr, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression is nested too deeply (max {MAX_DEPTH})")
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    elif isinstance(node, ast.UnaryOp):
        unary = _UNARY.get(type(node.op))
        if unary is not None:
            return unary(_eval(node.operand, depth + 1))
    elif isinstance(node, ast.BinOp):
        binary = _BINARY.get(type(node.op))
        if binary is not None:
            left = _eval(node.left, depth + 1)
            right = _eval(node.right, depth + 1)
            return _apply(binary, left, right)
    # _check_tree rejected everything else already; this is a second line of defence.
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def _apply(func: Callable[[Number, Number], Number], left: Number, right: Number) -> Number:
    try:
        result = func(left, right)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result is too large") from None
    return _check_result(result)


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent is too large (max {MAX_EXPONENT})")
    if base == 0:
        if exponent < 0:
            raise ZeroDivisionError
        return base**exponent  # 0 or 1, as int or float
    if base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        raise CalculatorError("fractional power of a negative number is not allowed")
    digits = exponent * math.log10(abs(base))
    if digits > MAX_DIGITS:
        raise CalculatorError(f"result is too large (more than {MAX_DIGITS} digits)")
    result: Number = base**exponent
    return result


def _check_result(value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculatorError("result is not a real number")
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise CalculatorError(f"result is too large (more than {MAX_DIGITS} digits)")
    elif not math.isfinite(value):
        raise CalculatorError("result is too large")
    return value
