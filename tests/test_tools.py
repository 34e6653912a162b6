"""Tests for the AST-walking calculator tool (nanochat's ``use_calculator`` without eval)."""

from __future__ import annotations

import ast
import builtins
import time
from pathlib import Path
from typing import Any

import pytest

from nanochat_mlx import tools
from nanochat_mlx.tools import MAX_EXPR_CHARS, use_calculator


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("2+2", "4"),
        ("8/2", "4.0"),
        ("0.1+0.2", "0.30000000000000004"),
        ("-3//2", "-2"),
        ("7//2", "3"),
        ("7.5//2", "3.0"),
        ("1/3", "0.3333333333333333"),
        ("10/4", "2.5"),
        ("2*(3+4)", "14"),
        ("-(2-5)", "3"),
        ("+-+3", "-3"),
        ("-0.0", "-0.0"),
        (".5+1.", "1.5"),
        ("00", "0"),
        ("  12 * 3 ", "36"),  # eval() tolerates leading blanks, so must we
        ("1,000+1", "1001"),
        ("1,234,567 * 2", "2469134"),
        ("123456789*987654321*123456789", str(123456789 * 987654321 * 123456789)),
        ("99999999999999999999+1", "100000000000000000000"),
    ],
)
def test_arithmetic_matches_python(expr: str, expected: str) -> None:
    assert use_calculator(expr) == expected


def test_float_overflow_gives_inf_like_python() -> None:
    big = "9" * 400 + ".0"  # a float literal past the float range is inf in Python
    assert use_calculator(big) == "inf"
    assert use_calculator("-" + big) == "-inf"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('"strawberry".count("r")', "3"),
        ("'banana'.count('an')", "2"),
        ('"abc".count("")', "4"),
        ('"Mississippi" .count( "ss" )', "2"),
        ('"a,b,a".count("a")', "2"),  # commas are removed everywhere, as in the reference
        ('"a" "ab".count("a")', "2"),  # implicit concatenation is still one literal
    ],
)
def test_count_form(expr: str, expected: str) -> None:
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", ['"aaa".count("a", 1)', '"aaaa".count("a", 1, 3)'])
def test_count_bounds_are_unreachable_because_commas_are_removed(expr: str) -> None:
    # The reference strips commas before anything else, so `"a".count("a" 1)` is a syntax error.
    assert use_calculator(expr) is None


@pytest.mark.parametrize("expr", ["2**10", "2 ** 3", "(2)**(2)"])
def test_power_is_rejected(expr: str) -> None:
    assert use_calculator(expr) is None


@pytest.mark.parametrize("expr", ["1e3", "abs(3)", "x+1", '"abc".upper()', "sqrt(16)", "True"])
def test_letters_without_count_are_rejected(expr: str) -> None:
    assert use_calculator(expr) is None


@pytest.mark.parametrize("expr", ["7%3", "1<2", "2^3", "[1]", "1;2", "a=1"])
def test_characters_outside_both_sets_are_rejected(expr: str) -> None:
    assert use_calculator(expr) is None


@pytest.mark.parametrize("expr", ['"profile".count("f")', '"direct".count("d")', '"Open".count("O")'])
def test_deny_list_applies_even_inside_string_literals(expr: str) -> None:
    assert use_calculator(expr) is None


@pytest.mark.parametrize("expr", ["1/0", "1//0", "1.0/0", "5//0.0", "(1+1)/(2-2)"])
def test_division_by_zero_is_none(expr: str) -> None:
    assert use_calculator(expr) is None


@pytest.mark.parametrize("expr", ["", "   ", "1+", "(1", "1 2", "01", "1..5", "*2", '"a".count(', "()", "..."])
def test_syntax_errors_and_non_numbers_are_none(expr: str) -> None:
    assert use_calculator(expr) is None


ESCAPES = [
    "__import__('os').system('touch PWNED')",
    "__import__ ('os') .system ('touch PWNED')",
    "().__class__.__bases__[0].__subclasses__()",
    '"a".count("a") or open("PWNED")',
    '"x".count("x")+eval("1")',
    'getattr("a", "count")("a")',
    "(lambda: 1)()",
    '(lambda x: x)("a".count("a"))',
    '[c for c in "abc"].count("a")',
    '("a".count("a") for c in "ab")',
    '"a".count.__self__',
    '"a".count("a").real',
    '"abc".upper().count("A")',
    '"abc".replace("a" "b").count("a")',
    '(1).count("a")',
    'b"aa".count(b"a")',
    'x.count("a")',
    '"a".count(x)',
    '"a".count("a", True)',
    '"a".count("a", 1, 2, 3)',
    '"a".count("a")("b")',
    '"a".count("a") and exit()',
    '"a".count("a") if 1 else 2',
    'not "a".count("a")',
    'print("a".count("a"))',
    'type("a".count("a"))',
    '"a".count(("a").count("a"))',
    "(1).__class__",
    "breakpoint()",
]


@pytest.mark.parametrize("expr", ESCAPES)
def test_escape_attempts_return_none_and_execute_nothing(
    expr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert use_calculator(expr) is None
    assert list(tmp_path.iterdir()) == []


def test_never_calls_eval_exec_or_compiles_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("eval/exec must not be called")

    real_compile = builtins.compile

    def ast_only_compile(*args: Any, **kwargs: Any) -> Any:
        # ast.parse is compile(..., flags=PyCF_ONLY_AST); anything else would produce code.
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        assert flags & ast.PyCF_ONLY_AST, "compile() to code must not be called"
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", ast_only_compile)
    assert use_calculator("2+2") == "4"
    assert use_calculator("8/2") == "4.0"
    assert use_calculator('"strawberry".count("r")') == "3"
    assert use_calculator("1/0") is None
    for expr in ESCAPES:
        assert use_calculator(expr) is None


def _timed(expr: str) -> tuple[str | None, float]:
    start = time.perf_counter()
    result = use_calculator(expr)
    return result, time.perf_counter() - start


def test_long_product_chain_within_limit_is_exact_and_fast() -> None:
    n = MAX_EXPR_CHARS // 2  # "9*9*...*9" just fits
    result, elapsed = _timed("*".join(["9"] * n))
    assert result == str(9**n)
    assert elapsed < 1.0


@pytest.mark.parametrize(
    "expr",
    [
        "*".join(["9999999"] * 10_000),  # would be an enormous int
        "*".join(["9" * 1000] * 2),  # two huge operands
        "+".join(["1"] * 100_000),  # merely very long
        "(" * 5000 + "1" + ")" * 5000,
    ],
)
def test_oversized_inputs_are_rejected_quickly(expr: str) -> None:
    result, elapsed = _timed(expr)
    assert result is None
    assert elapsed < 1.0


def test_int_size_limit_is_checked_before_multiplying(monkeypatch: pytest.MonkeyPatch) -> None:
    # The length limit alone keeps products small, so shrink the bit limit to observe the check:
    # an oversized product is refused from the operands' bit lengths, without multiplying.
    def no_multiply(left: object, right: object) -> object:
        raise AssertionError("multiplied an oversized product")

    monkeypatch.setattr(tools, "MAX_INT_BITS", 80)
    assert use_calculator("99999999999*99999999999") == str(99999999999**2)  # 74 bits
    monkeypatch.setitem(tools._BINARY, ast.Mult, no_multiply)
    assert use_calculator("9" * 21 + "*" + "9" * 21) is None  # 70 + 70 bits: never multiplied


def test_int_results_over_the_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "MAX_INT_BITS", 64)
    assert use_calculator("9223372036854775807+0") == "9223372036854775807"  # 63 bits
    assert use_calculator("18446744073709551615+1") is None  # 65 bits
    assert use_calculator("99999999999999999999999") is None  # an oversized literal


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("(" * 250 + "1" + ")" * 250, None),  # CPython: "too many nested parentheses"
        ("(" * 50 + "1" + ")" * 50, "1"),
        ("-" * 999 + "1", "-1"),  # deeper than the recursion limit: evaluated without recursion
        ("+".join(["1"] * 500), "500"),
    ],
)
def test_deep_nesting_is_handled(expr: str, expected: str | None) -> None:
    result, elapsed = _timed(expr)
    assert result == expected
    assert elapsed < 1.0
