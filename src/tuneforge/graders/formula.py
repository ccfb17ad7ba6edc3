"""The multi grader's `calculate_output`: arithmetic over the sub-graders' scores, read with `ast`, never `eval`.

What OpenAI lists is what is allowed: numbers, the sub-graders' names, + - * / and powers (`**`, or `^` as
OpenAI writes it), parentheses, unary minus, and min, max, abs, floor, ceil, exp, sqrt, log. Every other piece of
Python (attributes, subscripts, keywords, lambdas, comparisons, strings) is refused before anything is computed.
All arithmetic is in floats, so `9 ** 9 ** 9` overflows at once instead of computing a huge integer.
"""

from __future__ import annotations

import ast
import math
import operator

from tuneforge.graders.errors import GraderError

FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}

_ALLOWED = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.Call,
    *OPERATORS,
    *UNARY,
)


def parse(formula: str) -> ast.Expression:
    """The formula's tree, every node checked against what a formula may hold."""
    try:
        # OpenAI's formulas write powers as ^; read as Python's xor it would bind looser than + (a ^ 2 + 1 = a ^ 3)
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise GraderError("formula_parse_error", f"calculate_output: {formula!r} is not a formula ({exc})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise GraderError(
                "formula_parse_error", f"calculate_output: {type(node).__name__} is not allowed in a formula"
            )
        if isinstance(node, ast.Constant) and (type(node.value) not in (int, float)):
            raise GraderError("formula_parse_error", f"calculate_output: {node.value!r} is not a number")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords and node.args
        ):
            raise GraderError(
                "formula_parse_error",
                f"calculate_output: only {', '.join(FUNCTIONS)} may be called, with plain arguments",
            )
    return tree


def names(formula: str) -> set[str]:
    """The variables a formula reads (function names left out)."""
    tree = parse(formula)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in called}


def evaluate(formula: str, values: dict[str, float]) -> float:
    """The formula's value with each name bound to its sub-grader's score."""
    tree = parse(formula)
    unknown = names(formula) - set(values)
    if unknown:
        raise GraderError(
            "invalid_variable_error", f"calculate_output names no sub-grader: {', '.join(sorted(unknown))}"
        )
    try:
        result = float(_value(tree.body, values))
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
        raise GraderError("other_error", f"calculate_output: {exc}") from None
    if not math.isfinite(result):
        raise GraderError("other_error", f"calculate_output gave {result}")
    return result


def _value(node: ast.expr, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_value(node.operand, values))
    if isinstance(node, ast.BinOp):
        return OPERATORS[type(node.op)](_value(node.left, values), _value(node.right, values))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # parse allowed nothing else
    return float(FUNCTIONS[node.func.id](*(_value(a, values) for a in node.args)))
