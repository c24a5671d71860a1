"""Evaluate untrusted arithmetic (model output) without eval().

Rewards such as Countdown have to compute the value of an equation the policy wrote. TinyZero calls
``eval(expr, {"__builtins__": None}, {})`` after a character filter; that still lets ``9**9**9``
(hangs the trainer) through. Here the text is parsed with :func:`ast.parse` (which only builds a
syntax tree, it never compiles or runs code) and a small interpreter walks the tree, accepting
nothing but numeric literals, binary ``+ - * /``, unary ``+ -`` and parentheses (parentheses leave
no node of their own). Every limit is checked *before* the expensive step it protects:

* the length before parsing (bounds parse time and nesting depth),
* the node count before evaluating (bounds the recursion of the interpreter),
* each literal and each intermediate result against ``max_abs`` (bounds the size of numbers, so
  products of huge integers never get computed).
"""
from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction

__all__ = ["UnsafeExpression", "safe_eval"]


class UnsafeExpression(ValueError):
    """The expression is not plain arithmetic, is too big, or cannot be evaluated."""


_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Nodes that carry a value; operator tokens (ast.Add, ...) are not counted against max_nodes.
_VALUE_NODES = (ast.BinOp, ast.UnaryOp, ast.Constant)


def _parse(expr: str, max_len: int) -> ast.AST:
    if not isinstance(expr, str):
        raise UnsafeExpression(f"expected a string, got {type(expr).__name__}")
    if len(expr) > max_len:
        raise UnsafeExpression(f"expression longer than {max_len} characters")
    text = expr.strip()
    if not text:
        raise UnsafeExpression("empty expression")
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as err:
        raise UnsafeExpression(f"not a valid expression: {type(err).__name__}") from None


def _check_shape(tree: ast.AST, max_nodes: int, allow_unary: bool) -> None:
    """Reject any disallowed node and trees with more than ``max_nodes`` value nodes.

    ``ast.walk`` is iterative, so this cannot recurse deeply even on odd trees.
    """
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, _VALUE_NODES):
            count += 1
            if count > max_nodes:
                raise UnsafeExpression(f"more than {max_nodes} nodes")
        if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY_OPS:
            raise UnsafeExpression(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.UnaryOp) and (not allow_unary or type(node.op) not in _UNARY_OPS):
            raise UnsafeExpression(f"unary operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.Constant):
            # bool is a subclass of int; complex and str are not numbers we accept.
            if type(node.value) not in (int, float):
                raise UnsafeExpression(f"literal of type {type(node.value).__name__} is not allowed")
        elif not isinstance(node, _VALUE_NODES) and type(node) not in _BINARY_OPS \
                and type(node) not in _UNARY_OPS:
            raise UnsafeExpression(f"{type(node).__name__} is not allowed")


def _checked(value: float, max_abs: float) -> float:
    if isinstance(value, float) and not math.isfinite(value):
        raise UnsafeExpression("non-finite value")
    if abs(value) > max_abs:
        raise UnsafeExpression(f"magnitude over {max_abs:g}")
    return value


def _evaluate(node: ast.AST, max_abs: float, exact: bool):
    # Depth is bounded by the node count checked in _check_shape, so plain recursion is safe.
    if isinstance(node, ast.Constant):
        value = _checked(node.value, max_abs)
        return Fraction(value) if exact else value
    if isinstance(node, ast.UnaryOp):
        return _checked(_UNARY_OPS[type(node.op)](_evaluate(node.operand, max_abs, exact)), max_abs)
    left = _evaluate(node.left, max_abs, exact)
    right = _evaluate(node.right, max_abs, exact)
    if isinstance(node.op, ast.Div) and right == 0:
        raise UnsafeExpression("division by zero")
    # Operands are at most max_abs, so even an int product is cheap to compute before the check (and a
    # Fraction's denominator grows by at most one literal per node: a few hundred bits at most).
    return _checked(_BINARY_OPS[type(node.op)](left, right), max_abs)


def safe_eval(expr: str, max_len: int = 200, max_abs: float = 1e12, max_nodes: int = 64,
              allow_unary: bool = True, exact: bool = False) -> float | Fraction:
    """Value of an arithmetic expression such as ``"(95 - 37) + 4"`` as a float (a Fraction with ``exact``).

    Raises :class:`UnsafeExpression` (a ``ValueError``) for anything that is not numeric literals
    combined with binary ``+ - * /``, unary ``+ -`` and parentheses, for text longer than
    ``max_len``, more than ``max_nodes`` value nodes, any literal or intermediate result with
    magnitude over ``max_abs``, and division by zero. ``allow_unary=False`` also rejects unary ``+``/``-``
    (Countdown: ``-5 + 6`` would use a number -5 that was never given). ``exact=True`` computes with
    fractions, so ``1 / 3 * 3`` is exactly 1 and no tolerance is needed to compare with a target.
    """
    tree = _parse(expr, max_len)
    _check_shape(tree, max_nodes, allow_unary)
    try:
        value = _evaluate(tree, max_abs, exact)
        return value if exact else float(value)
    except (RecursionError, MemoryError, OverflowError) as err:
        raise UnsafeExpression(f"evaluation failed: {type(err).__name__}") from None
