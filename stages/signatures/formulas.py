"""Formula concepts: logical combinations of segmentation labels (SEMANTICS.md §6).

Compositional explanations (Mu & Andreas 2020) score a unit against formulas such as
``(water OR sea) AND NOT boat`` instead of single labels.  This module holds the formula
trees, prints them back canonically and evaluates them on boolean masks;
:mod:`stages.signatures.parsing` turns written formulas (and YAML files of them) into trees.
NOT binds tighter than AND, AND tighter than OR; AND and OR are left-associative.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from storage.errors import UserError

T = TypeVar("T")
R = TypeVar("R")

KEYWORDS = frozenset({"AND", "OR", "NOT"})
BARE_NAME = re.compile(r"[\w\-./']+")
# Precedence levels used by format_formula to decide where parentheses are needed.
_PREC_OR, _PREC_AND, _PREC_NOT, _PREC_ATOM = 1, 2, 3, 4
_Part = tuple[str, int]  # text and precedence of a formatted sub-formula


class FormulaError(UserError):
    """A formula the user wrote cannot be parsed, names an unknown label, or is misconfigured.

    The message is one line; ``position`` is the 0-based character offset of the problem in
    the formula text when there is one, so callers can point at it without parsing the text.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class Label:
    """A leaf: the mask of one segmentation label."""

    name: str

    def __post_init__(self) -> None:
        # An empty or non-string name could never be written back as formula text.
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"label name must be a non-empty string, got {self.name!r}")


@dataclass(frozen=True)
class Not:
    """Complement of a sub-formula."""

    operand: Formula


@dataclass(frozen=True)
class And:
    """Intersection of two sub-formulas."""

    left: Formula
    right: Formula


@dataclass(frozen=True)
class Or:
    """Union of two sub-formulas."""

    left: Formula
    right: Formula


Formula = Label | Not | And | Or


# --------------------------------------------------------------------------- text helpers


def display(text: str) -> str:
    """Formula text safe for a one-line message; same length, so positions still line up."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _error(text: str, detail: str, position: int | None) -> FormulaError:
    return FormulaError(f'formula "{display(text)}": {detail}', position)


def is_keyword(word: str) -> bool:
    return word.isascii() and word.upper() in KEYWORDS


def _needs_quotes(name: str) -> bool:
    return BARE_NAME.fullmatch(name) is None or is_keyword(name)


# --------------------------------------------------------------------------- tree walks


def _fold(
    formula: Formula,
    leaf: Callable[[str], R],
    negate: Callable[[R], R],
    both: Callable[[R, R], R],
    either: Callable[[R, R], R],
) -> R:
    """Combine a tree bottom-up, left to right, with an explicit stack (no recursion limit)."""
    pending: list[tuple[Formula, bool]] = [(formula, False)]
    results: list[R] = []
    while pending:
        node, children_done = pending.pop()
        if isinstance(node, Label):
            results.append(leaf(node.name))
        elif not children_done:
            pending.append((node, True))
            if isinstance(node, Not):
                pending.append((node.operand, False))
            elif isinstance(node, And | Or):
                pending.append((node.right, False))
                pending.append((node.left, False))
            else:
                raise TypeError(f"not a formula node: {node!r}")
        elif isinstance(node, Not):
            results.append(negate(results.pop()))
        else:
            right = results.pop()
            left = results.pop()
            results.append(both(left, right) if isinstance(node, And) else either(left, right))
    return results[0]


def _leaves(formula: Formula) -> Iterator[str]:
    """Label names in left-to-right order, repeats included."""
    pending: list[Formula] = [formula]
    while pending:
        node = pending.pop()
        if isinstance(node, Label):
            yield node.name
        elif isinstance(node, Not):
            pending.append(node.operand)
        elif isinstance(node, And | Or):
            pending.append(node.right)
            pending.append(node.left)
        else:
            raise TypeError(f"not a formula node: {node!r}")


def formula_labels(formula: Formula) -> set[str]:
    """Names of the labels a formula uses, so callers know which masks to load."""
    return set(_leaves(formula))


def formula_length(formula: Formula) -> int:
    """Number of label leaves (repeats counted): the formula-length limit of the beam search."""
    return sum(1 for _ in _leaves(formula))


def _format_name(name: str) -> str:
    if not _needs_quotes(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_formula(formula: Formula) -> str:
    """Canonical text with minimal parentheses; parse_formula gives back an equal tree.

    Keywords are upper-case. A right operand of the same operator keeps its parentheses,
    because AND and OR parse left-associatively.
    """

    def wrap(part: _Part, parenthesize: bool) -> str:
        return f"({part[0]})" if parenthesize else part[0]

    def binary(keyword: str, prec: int) -> Callable[[_Part, _Part], _Part]:
        def combine(left: _Part, right: _Part) -> _Part:
            text = f"{wrap(left, left[1] < prec)} {keyword} {wrap(right, right[1] <= prec)}"
            return text, prec

        return combine

    text, _ = _fold(
        formula,
        lambda name: (_format_name(name), _PREC_ATOM),
        lambda part: ("NOT " + wrap(part, part[1] < _PREC_NOT), _PREC_NOT),
        binary("AND", _PREC_AND),
        binary("OR", _PREC_OR),
    )
    return text


# --------------------------------------------------------------------------- evaluation


def _check_mask(name: str, value: object) -> None:
    # ~ on an integer mask flips every bit (~1 == -2, ~uint8(1) == 254), so only bool is safe.
    dtype = getattr(value, "dtype", None)
    if str(dtype) not in ("bool", "torch.bool"):
        raise TypeError(
            f"lookup({name!r}) returned {type(value).__name__} with dtype {dtype}; "
            "evaluate needs boolean arrays or tensors"
        )


def evaluate(formula: Formula, lookup: Callable[[str], T]) -> T:
    """Combine boolean masks with ``&``, ``|`` and ``~`` (numpy, torch or any array alike).

    ``lookup`` is called once per distinct label in this call, since loading a mask can be
    costly. Looked-up masks are never modified in place; a formula that is a single label
    returns the looked-up mask itself.
    """
    cache: dict[str, T] = {}

    def leaf(name: str) -> T:
        if name not in cache:
            value = lookup(name)
            _check_mask(name, value)
            cache[name] = value
        return cache[name]

    return _fold(
        formula,
        leaf,
        lambda mask: ~mask,  # type: ignore[operator]
        lambda left, right: left & right,  # type: ignore[operator]
        lambda left, right: left | right,  # type: ignore[operator]
    )


