"""Tests for the formula-concept language (stages/signatures/formulas.py, parsing.py)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.signatures.formulas import (
    And,
    Formula,
    FormulaError,
    Label,
    Not,
    Or,
    evaluate,
    format_formula,
    formula_labels,
    formula_length,
)
from stages.signatures.parsing import check_labels, load_formulas, parse_formula
from storage.errors import UserError

a, b, c, d = Label("a"), Label("b"), Label("c"), Label("d")


def syntax_error(text: str) -> FormulaError:
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    err = info.value
    assert "\n" not in str(err)
    assert str(err).startswith(f'formula "{text}": ')
    return err


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a", a),
        ("a OR b AND NOT c", Or(a, And(b, Not(c)))),
        ("NOT a AND b", And(Not(a), b)),
        ("NOT a OR b", Or(Not(a), b)),
        ("a AND b OR c AND d", Or(And(a, b), And(c, d))),
        ("a OR b OR c", Or(Or(a, b), c)),
        ("a AND b AND c", And(And(a, b), c)),
        ("NOT NOT a", Not(Not(a))),
    ],
)
def test_precedence_and_associativity(text: str, expected: Formula) -> None:
    assert parse_formula(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(a OR b) AND c", And(Or(a, b), c)),
        ("a AND (b OR c)", And(a, Or(b, c))),
        ("a OR (b OR c)", Or(a, Or(b, c))),
        ("NOT (a AND b)", Not(And(a, b))),
        ("((a))", a),
        ("(((a OR b)) AND ((NOT c)))", And(Or(a, b), Not(c))),
        ("(water OR sea) AND NOT boat", And(Or(Label("water"), Label("sea")), Not(Label("boat")))),
    ],
)
def test_parentheses(text: str, expected: Formula) -> None:
    assert parse_formula(text) == expected


def test_whitespace_is_optional_around_parentheses() -> None:
    assert parse_formula("(a OR b)AND(NOT c)") == And(Or(a, b), Not(c))
    assert parse_formula("  a\tAND\n b  ") == And(a, b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a and b", And(a, b)),
        ("a And b", And(a, b)),
        ("a aNd b", And(a, b)),
        ("a or not b", Or(a, Not(b))),
        ("Not a oR b", Or(Not(a), b)),
        ("nOT a AnD b Or c", Or(And(Not(a), b), c)),
    ],
)
def test_keywords_are_case_insensitive(text: str, expected: Formula) -> None:
    assert parse_formula(text) == expected


@pytest.mark.parametrize(
    "name", ["sea-s", "t-shirt", "dining_room-s", "potter's_wheel", "a.b", "n/a", "2x", "-x"]
)
def test_broden_names_parse_bare(name: str) -> None:
    assert parse_formula(name) == Label(name)
    assert parse_formula(f"NOT {name} AND x") == And(Not(Label(name)), Label("x"))


def test_quoted_names() -> None:
    assert parse_formula('"living room"') == Label("living room")
    assert parse_formula('"living room" OR "and"') == Or(Label("living room"), Label("and"))
    assert parse_formula('NOT "NOT"') == Not(Label("NOT"))
    assert parse_formula('"a \\"b\\" \\\\ c"') == Label('a "b" \\ c')
    assert parse_formula('"sea-s"') == Label("sea-s")


def test_keyword_prefixed_names_are_labels() -> None:
    assert parse_formula("notebook AND order") == And(Label("notebook"), Label("order"))
    assert parse_formula("android") == Label("android")


# --------------------------------------------------------------------------- syntax errors


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        # dangling operators
        ("(water OR", 9, "expected a label or '(' at position 9, found end of formula"),
        ("a AND", 5, "expected a label or '(' at position 5"),
        ("a AND NOT", 9, "expected a label or '(' at position 9"),
        ("OR a", 0, "expected a label or '(' at position 0, found keyword 'OR'"),
        ("a OR AND b", 5, "found keyword 'AND'"),
        ("a AND ()", 7, "found ')'"),
        # unbalanced parentheses
        ("(a OR b", 7, "expected ')' at position 7, found end of formula"),
        ("((a)", 4, "expected ')' at position 4"),
        ("a OR b)", 6, "unmatched ')' at position 6"),
        (")", 0, "expected a label or '(' at position 0, found ')'"),
        # empty
        ("", 0, "formula is empty"),
        ("   ", 0, "formula is empty"),
        ("()", 1, "expected a label or '(' at position 1, found ')'"),
        # stray tokens
        ("a b", 2, "expected AND, OR or end of formula at position 2, found label 'b'"),
        ("a (b)", 2, "found '('"),
        ("(a b)", 3, "expected AND, OR or ')' at position 3, found label 'b'"),
        ("a NOT b", 2, "found keyword 'NOT'"),
        ("a & b", 2, "unexpected character '&' at position 2"),
        ("a AND b,", 7, "unexpected character ',' at position 7"),
        # keywords used as names
        ("water AND or", 10, "found keyword 'or' (write \"or\" in double quotes"),
        ("and", 0, "found keyword 'and'"),
        ("a OR not", 8, "found end of formula"),
        # quoting problems
        ('"living room', 0, "unterminated quoted label starting at position 0"),
        ('a OR ""', 5, "empty quoted label at position 5"),
        ('"a\\n"', 2, "invalid escape"),
    ],
)
def test_syntax_errors(text: str, position: int, fragment: str) -> None:
    err = syntax_error(text)
    assert err.position == position
    assert f"position {position}" in str(err)
    assert fragment in str(err)
    assert isinstance(err, UserError)


def test_syntax_error_message_shape() -> None:
    err = syntax_error("(water OR")
    assert str(err) == (
        "formula \"(water OR\": expected a label or '(' at position 9, found end of formula"
    )


def test_syntax_error_with_newline_stays_one_line() -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula("a AND\n\nOR b")
    assert str(info.value).startswith('formula "a AND  OR b": ')  # same length: positions hold
    assert info.value.position == 7


def test_deep_nesting_is_refused_cleanly() -> None:
    with pytest.raises(FormulaError, match="nested deeper"):
        parse_formula("(" * 500 + "a" + ")" * 500)
    assert parse_formula("(" * 50 + "a" + ")" * 50) == a


def test_long_chains_and_negations_do_not_recurse() -> None:
    text = " AND ".join(f"l{i}" for i in range(5000))
    formula = parse_formula(text)
    assert formula_length(formula) == 5000
    assert format_formula(formula) == text
    assert formula_length(parse_formula("NOT " * 5000 + "a")) == 1


def test_non_string_input() -> None:
    with pytest.raises(FormulaError, match="must be a string"):
        parse_formula(None)  # type: ignore[arg-type]


def test_error_survives_pickling() -> None:
    err = syntax_error("a b")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.position == 2


# --------------------------------------------------------------------------- labels, length


def test_formula_labels_and_length() -> None:
    formula = parse_formula('(water OR sea) AND NOT water AND "living room"')
    assert formula_labels(formula) == {"water", "sea", "living room"}
    assert formula_length(formula) == 4
    assert formula_length(a) == 1


def test_label_rejects_empty_name() -> None:
    with pytest.raises(ValueError):
        Label("")


def test_check_labels_accepts_known() -> None:
    text = "(water OR sea) AND NOT boat"
    check_labels(parse_formula(text), text, ["water", "sea", "boat", "tree"])
    check_labels(parse_formula(text), text, iter(["water", "sea", "boat"]))


def test_unknown_label_names_label_and_position() -> None:
    text = "(water OR sea) AND NOT boatt"
    with pytest.raises(FormulaError) as info:
        check_labels(parse_formula(text), text, ["water", "sea", "boat"])
    message = str(info.value)
    assert message.startswith(
        "formula \"(water OR sea) AND NOT boatt\": unknown label 'boatt' at position 23"
    )
    assert "did you mean 'boat'" in message
    assert info.value.position == 23


def test_unknown_label_reports_first_in_text_order() -> None:
    text = 'zz OR "living rom" OR yy'
    with pytest.raises(FormulaError) as info:
        check_labels(parse_formula(text), text, ["zz", "living room"])
    assert "unknown label 'living rom' at position 6" in str(info.value)


def test_unknown_label_without_matching_text_has_no_position() -> None:
    with pytest.raises(FormulaError, match="unknown label 'q'$") as info:
        check_labels(Label("q"), "something else", ["a"])
    assert info.value.position is None


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("formula", "text"),
    [
        (Or(a, And(b, Not(c))), "a OR b AND NOT c"),
        (And(Or(a, b), c), "(a OR b) AND c"),
        (And(a, And(b, c)), "a AND (b AND c)"),
        (Or(Or(a, b), c), "a OR b OR c"),
        (Not(Or(a, b)), "NOT (a OR b)"),
        (Not(Not(a)), "NOT NOT a"),
        (Label("living room"), '"living room"'),
        (Label("or"), '"or"'),
        (Label('say "hi"\\'), '"say \\"hi\\"\\\\"'),
        (Label("t-shirt"), "t-shirt"),
    ],
)
def test_format_minimal_parentheses(formula: Formula, text: str) -> None:
    assert format_formula(formula) == text
    assert parse_formula(text) == formula


NAMES = ["a", "b", "sea-s", "t-shirt", "living room", "and", "Or", "NOT", 'q"x', "\\", "é/1"]


def formulas(names: st.SearchStrategy[str]) -> st.SearchStrategy[Formula]:
    leaves = names.map(Label)
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            children.map(Not),
            st.builds(And, children, children),
            st.builds(Or, children, children),
        ),
        max_leaves=12,
    )


@settings(max_examples=400, deadline=None)
@given(formulas(st.sampled_from(NAMES)))
def test_format_parse_round_trip(formula: Formula) -> None:
    text = format_formula(formula)
    assert parse_formula(text) == formula
    assert format_formula(parse_formula(text)) == text


@settings(max_examples=200, deadline=None)
@given(formulas(st.text(min_size=1, max_size=6)))
def test_round_trip_with_arbitrary_names(formula: Formula) -> None:
    assert parse_formula(format_formula(formula)) == formula


@settings(max_examples=200, deadline=None)
@given(formulas(st.sampled_from(["a", "b", "c"])), st.randoms(use_true_random=False))
def test_parse_ignores_case_and_spacing(formula: Formula, rnd) -> None:
    text = format_formula(formula)

    def scramble(match: re.Match[str]) -> str:
        word = "".join(ch.lower() if rnd.random() < 0.5 else ch for ch in match.group())
        return word + " " * rnd.randint(0, 2)

    scrambled = re.sub(r"\b(AND|OR|NOT)\b", scramble, text)
    scrambled = scrambled.replace("(", "( ").replace(")", " )")
    assert parse_formula(scrambled) == formula


# --------------------------------------------------------------------------- evaluation


A = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
B = np.array([[0, 1, 1], [0, 0, 0]], dtype=bool)
C = np.array([[0, 1, 0], [1, 0, 1]], dtype=bool)
MASKS = {"A": A, "B": B, "C": C}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(A OR B) AND NOT C", np.array([[1, 0, 1], [0, 0, 0]], dtype=bool)),
        ("A OR B AND NOT C", np.array([[1, 1, 1], [0, 0, 1]], dtype=bool)),
        ("NOT A", np.array([[0, 0, 1], [1, 1, 0]], dtype=bool)),
        ("A AND B", np.array([[0, 1, 0], [0, 0, 0]], dtype=bool)),
        ("NOT (A OR B OR C)", np.array([[0, 0, 0], [0, 1, 0]], dtype=bool)),
        ("A", A),
    ],
)
def test_evaluate_numpy(text: str, expected: np.ndarray) -> None:
    result = evaluate(parse_formula(text), MASKS.__getitem__)
    assert result.dtype == bool
    np.testing.assert_array_equal(result, expected)


def test_evaluate_torch() -> None:
    masks = {name: torch.from_numpy(mask) for name, mask in MASKS.items()}
    result = evaluate(parse_formula("(A OR B) AND NOT C"), masks.__getitem__)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.bool
    assert torch.equal(result, torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool))


def test_evaluate_looks_up_each_label_once_and_leaves_masks_unchanged() -> None:
    calls: list[str] = []
    originals = {name: mask.copy() for name, mask in MASKS.items()}

    def lookup(name: str) -> np.ndarray:
        calls.append(name)
        return MASKS[name]

    result = evaluate(parse_formula("(A AND NOT B) OR (B AND NOT A) OR A OR C"), lookup)
    assert sorted(calls) == ["A", "B", "C"]
    np.testing.assert_array_equal(result, A | C | (B & ~A))
    for name, mask in MASKS.items():
        np.testing.assert_array_equal(mask, originals[name])
    calls.clear()
    evaluate(parse_formula("A AND A"), lookup)
    assert calls == ["A"]  # the cache lives for one call only


@settings(max_examples=200, deadline=None)
@given(formulas(st.sampled_from(["A", "B", "C"])))
def test_evaluate_matches_truth_table(formula: Formula) -> None:
    rows = np.array([[(i >> bit) & 1 for i in range(8)] for bit in range(3)], dtype=bool)
    masks = dict(zip("ABC", rows, strict=True))

    def truth(node: Formula, values: dict[str, bool]) -> bool:
        if isinstance(node, Label):
            return values[node.name]
        if isinstance(node, Not):
            return not truth(node.operand, values)
        if isinstance(node, And):
            return truth(node.left, values) and truth(node.right, values)
        return truth(node.left, values) or truth(node.right, values)

    expected = [truth(formula, {k: bool(v[i]) for k, v in masks.items()}) for i in range(8)]
    np.testing.assert_array_equal(evaluate(formula, masks.__getitem__), expected)


@pytest.mark.parametrize("bad", [np.array([1, 0], dtype=np.uint8), True, torch.tensor([1, 0])])
def test_evaluate_rejects_non_boolean_masks(bad: object) -> None:
    with pytest.raises(TypeError, match="boolean"):
        evaluate(parse_formula("NOT x"), lambda name: bad)


# --------------------------------------------------------------------------- YAML files

KNOWN = ["water", "sea", "boat", "living room", "tree"]


def write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "formulas.yaml"
    path.write_text(content, encoding="utf-8")
    return path


def load_error(path: Path | str, known: list[str] = KNOWN) -> str:
    with pytest.raises(FormulaError) as info:
        load_formulas(path, known)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_load_formulas(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'no_boat: "(water OR sea) AND NOT boat"\nroom: \'"living room" or tree\'\nsea: sea\n',
    )
    loaded = load_formulas(str(path), iter(KNOWN))
    assert list(loaded) == ["no_boat", "room", "sea"]
    assert loaded["no_boat"] == parse_formula("(water OR sea) AND NOT boat")
    assert loaded["room"] == Or(Label("living room"), Label("tree"))
    assert load_formulas(path, KNOWN) == loaded
    assert load_formulas(write(tmp_path, "{}\n"), KNOWN) == {}


def test_load_formulas_unknown_label_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'ok: water\nno_boat: "(water OR sea) AND NOT boatt"\n')
    message = load_error(path)
    assert message.startswith(
        f"{path}: key 'no_boat': formula \"(water OR sea) AND NOT boatt\": "
        "unknown label 'boatt' at position 23"
    )


def test_load_formulas_syntax_error_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'broken: "(water OR"\n')
    message = load_error(path)
    assert message == (
        f"{path}: key 'broken': formula \"(water OR\": "
        "expected a label or '(' at position 9, found end of formula"
    )


def test_load_formulas_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert "not found" in load_error(path)
    assert "not a file" in load_error(tmp_path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "file is empty"),
        ("- water\n- sea\n", "expected a mapping of name -> formula, got a list"),
        ("just water\n", "got a str"),
        ("a: [water, sea]\n", "key 'a': expected a formula string, got a list"),
        ("a: 3\n", "key 'a': expected a formula string, got a int (quote the formula in YAML)"),
        ("a:\n", "key 'a': expected a formula string, got nothing"),
        ("1: water\n", "key 1 is not a non-empty string"),
        ("a: '  '\n", "key 'a': formula is empty"),
        ("a: water\na: sea\n", "duplicate key 'a'"),
        ("a: [water\n", "invalid YAML at line"),
    ],
)
def test_load_formulas_bad_files(tmp_path: Path, content: str, fragment: str) -> None:
    assert fragment in load_error(write(tmp_path, content))


def test_load_formulas_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "formulas.yaml"
    path.write_bytes(b"a: \xff\xfe\n")
    assert "UTF-8" in load_error(path)


# --------------------------------------------------------------------------- hygiene


def test_source_does_not_use_eval() -> None:
    source = (Path(__file__).parents[1] / "stages" / "signatures" / "parsing.py").read_text(encoding="utf-8")
    assert re.search(r"(?<![\w.])(eval|exec|compile|__import__)\s*\(", source) is None
