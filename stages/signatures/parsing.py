"""Reading formulas: a hand-written tokenizer and recursive-descent parser (never ``eval``)
with positions in every message, label checks against a label set ("did you mean"), and
YAML files of named formulas.

Grammar (NOT binds tighter than AND, AND tighter than OR; AND and OR are left-associative)::

    expr   := term ("OR" term)*
    term   := factor ("AND" factor)*
    factor := "NOT" factor | atom
    atom   := LABEL | "(" expr ")"

Keywords are case-insensitive. A bare label is a run of letters, digits and ``_ - . ' /``;
any other name (spaces, a keyword, other characters) is written in double quotes, with
``\\"`` and ``\\\\`` as the only escapes. Positions in messages are 0-based character offsets.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.signatures.formulas import (
    BARE_NAME,
    KEYWORDS,
    And,
    Formula,
    FormulaError,
    Label,
    Not,
    Or,
    display,
    formula_labels,
    is_keyword,
)

# Parentheses deeper than this are refused so parsing can never hit Python's recursion limit.
_MAX_NESTING = 100

def _error(text: str, detail: str, position: int | None) -> FormulaError:
    return FormulaError(f'formula "{display(text)}": {detail}', position)



# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Token:
    kind: str  # "LABEL", "AND", "OR", "NOT", "(", ")" or "END"
    value: str  # label name (unquoted) or the keyword/punctuation as written
    pos: int

    def describe(self) -> str:
        """How the token is named in 'found ...' parts of error messages."""
        if self.kind == "END":
            return "end of formula"
        if self.kind == "LABEL":
            return f"label {self.value!r}"
        if self.kind in KEYWORDS:
            return f"keyword {self.value!r}"
        return f"'{self.value}'"


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """Read a double-quoted name starting at ``text[start] == '"'``; return (name, end)."""
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if not chars:
                raise _error(text, f"empty quoted label at position {start}", start)
            return "".join(chars), i + 1
        if ch == "\\":
            if i + 1 >= len(text):
                break
            escaped = text[i + 1]
            if escaped not in '"\\':
                raise _error(
                    text,
                    f"invalid escape {ch + escaped!r} at position {i} "
                    '(only \\" and \\\\ are allowed inside quotes)',
                    i,
                )
            chars.append(escaped)
            i += 2
            continue
        chars.append(ch)
        i += 1
    raise _error(text, f"unterminated quoted label starting at position {start}", start)


def _tokenize(text: str) -> Iterator[_Token]:
    """Split formula text into tokens, ending with one END token at ``len(text)``."""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "()":
            yield _Token(ch, ch, i)
            i += 1
        elif ch == '"':
            name, end = _read_quoted(text, i)
            yield _Token("LABEL", name, i)
            i = end
        else:
            match = BARE_NAME.match(text, i)
            if match is None:
                hint = " (use AND, OR, NOT)" if ch in "&|!~^" else ""
                raise _error(text, f"unexpected character {ch!r} at position {i}{hint}", i)
            word = match.group()
            kind = word.upper() if is_keyword(word) else "LABEL"
            yield _Token(kind, word, i)
            i = match.end()
    yield _Token("END", "", len(text))


# --------------------------------------------------------------------------- parser


class _Parser:
    """Recursive-descent parser over the token list of one formula text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_tokenize(text))
        self.index = 0
        self.depth = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "END":
            self.index += 1
        return token

    def fail(self, expected: str, token: _Token, note: str = "") -> FormulaError:
        detail = f"expected {expected} at position {token.pos}, found {token.describe()}"
        return _error(self.text, detail + note, token.pos)

    def parse(self) -> Formula:
        if not self.text.strip():
            raise _error(self.text, "expected a label or '(' at position 0 (formula is empty)", 0)
        formula = self.expr()
        token = self.current
        if token.kind == ")":
            raise _error(self.text, f"unmatched ')' at position {token.pos}", token.pos)
        if token.kind != "END":
            raise self.fail("AND, OR or end of formula", token)
        return formula

    def expr(self) -> Formula:
        formula = self.term()
        while self.current.kind == "OR":
            self.advance()
            formula = Or(formula, self.term())
        return formula

    def term(self) -> Formula:
        formula = self.factor()
        while self.current.kind == "AND":
            self.advance()
            formula = And(formula, self.factor())
        return formula

    def factor(self) -> Formula:
        # NOT chains are counted in a loop rather than by recursion, so any length parses.
        negations = 0
        while self.current.kind == "NOT":
            self.advance()
            negations += 1
        formula = self.atom()
        for _ in range(negations):
            formula = Not(formula)
        return formula

    def atom(self) -> Formula:
        token = self.current
        if token.kind == "LABEL":
            self.advance()
            return Label(token.value)
        if token.kind == "(":
            if self.depth >= _MAX_NESTING:
                detail = f"parentheses nested deeper than {_MAX_NESTING} at position {token.pos}"
                raise _error(self.text, detail, token.pos)
            self.advance()
            self.depth += 1
            formula = self.expr()
            self.depth -= 1
            closing = self.current
            if closing.kind != ")":
                if closing.kind == "END":
                    raise self.fail("')'", closing, f" (to close '(' at position {token.pos})")
                raise self.fail("AND, OR or ')'", closing)
            self.advance()
            return formula
        note = ""
        if token.kind in KEYWORDS:
            note = f' (write "{token.value}" in double quotes to use it as a label)'
        raise self.fail("a label or '('", token, note)


def parse_formula(text: str) -> Formula:
    """Parse formula text into a tree; raise FormulaError (one line, with position) if invalid."""
    if not isinstance(text, str):
        raise FormulaError(f"formula must be a string, got {type(text).__name__}")
    return _Parser(text).parse()


# --------------------------------------------------------------------------- label checks


def _first_written(text: str, names: set[str]) -> tuple[str, int] | None:
    """The first of ``names`` written in ``text`` and its position, if the text tokenizes."""
    try:
        for token in _tokenize(text):
            if token.kind == "LABEL" and token.value in names:
                return token.value, token.pos
    except FormulaError:
        pass
    return None


def _unknown_label_error(name: str, position: int | None, known: set[str]) -> str:
    where = f" at position {position}" if position is not None else ""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown label {name!r}{where}{hint}"


def check_labels(formula: Formula, text: str, known: Iterable[str]) -> None:
    """Raise FormulaError naming the first unknown label (in text order) and its position.

    ``text`` is the source the formula was parsed from; the tree keeps no positions, so the
    text is re-tokenized to find where the label is written.
    """
    known_set = set(known)
    unknown = formula_labels(formula) - known_set
    if not unknown:
        return
    found = _first_written(text, unknown)
    # Without a match the text does not spell this formula: report the label without a position.
    name, position = found if found is not None else (min(unknown), None)
    raise _error(text, _unknown_label_error(name, position, known_set), position)


# --------------------------------------------------------------------------- YAML files


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loader that refuses duplicate keys instead of silently keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"invalid YAML{where}: {problem}".split())


def load_formulas(path: str | Path, known: Iterable[str]) -> dict[str, Formula]:
    """Read a YAML mapping of concept name -> formula text, parsed and checked against labels.

    Errors name the file and the key, so a user can fix the entry without reading a traceback.
    """
    where = str(path)
    file = Path(path)
    if not file.exists():
        raise FormulaError(f"{where}: formula file not found")
    if not file.is_file():
        raise FormulaError(f"{where}: not a file")
    try:
        source = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FormulaError(f"{where}: not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise FormulaError(f"{where}: cannot read: {err.strerror or err}") from err
    try:
        data = yaml.load(source, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise FormulaError(f"{where}: {_yaml_problem(err)}") from err

    if data is None:
        raise FormulaError(f"{where}: file is empty; expected a mapping of name -> formula")
    if not isinstance(data, dict):
        raise FormulaError(
            f"{where}: expected a mapping of name -> formula, got a {type(data).__name__}"
        )

    known_set = set(known)
    formulas: dict[str, Formula] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.strip():
            raise FormulaError(f"{where}: key {key!r} is not a non-empty string")
        prefix = f"{where}: key {key!r}"
        if not isinstance(value, str):
            kind = "nothing" if value is None else f"a {type(value).__name__}"
            hint = " (quote the formula in YAML)" if isinstance(value, bool | int | float) else ""
            raise FormulaError(f"{prefix}: expected a formula string, got {kind}{hint}")
        if not value.strip():
            raise FormulaError(f"{prefix}: formula is empty")
        try:
            formula = parse_formula(value)
            check_labels(formula, value, known_set)
        except FormulaError as err:
            raise FormulaError(f"{prefix}: {err}", err.position) from err
        formulas[key] = formula
    return formulas

