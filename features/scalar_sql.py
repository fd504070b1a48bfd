"""A mapping's SQL, checked before Polars sees it: scalar expressions over the row's own columns, nothing else.

Polars runs a SQL expression's subqueries and table functions while *parsing* it: ``pl.sql_expr("1 IN (SELECT x
FROM read_csv('/etc/passwd'))")`` opens the file (and shows its first line in the error), and a URL in its place is
fetched. A mapping comes from whoever wrote the import config, so ``scalar_sql`` parses the text with sqlglot (the
standard SQL parser in Python) first, checks every node of the tree against an allow-list (unqualified columns,
literals, arithmetic, comparisons, boolean logic, ``CASE``, ``CAST``, ``IN`` over a list of values, ``IS [NOT]
NULL``, ``LIKE``, ``BETWEEN`` and the scalar functions in ``FUNCTIONS``) and returns the expression written back from
that tree (comments dropped). Only that text reaches Polars, so Polars never parses anything the check did not read.
"""

from __future__ import annotations

import polars as pl
import sqlglot
from sqlglot import exp

OPERATORS = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Paren,
    exp.Neg,
    exp.Not,
    exp.And,
    exp.Or,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.Mod,
    exp.IntDiv,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Like,
    exp.ILike,
    exp.Case,
    exp.If,
    exp.Cast,
    exp.TryCast,
    exp.DataType,
    exp.DataTypeParam,
    exp.DPipe,
)
FUNCTIONS = (
    exp.Abs,
    exp.Ceil,
    exp.Coalesce,
    exp.Concat,
    exp.Floor,
    exp.Greatest,
    exp.Least,
    exp.Length,
    exp.Ln,
    exp.Lower,
    exp.Nullif,
    exp.Pow,
    exp.Round,
    exp.Sign,
    exp.Sqrt,
    exp.Substring,
    exp.Trim,
    exp.Upper,
)
ALLOWED = OPERATORS + FUNCTIONS


class UnsafeSQLError(ValueError):
    """A mapping's SQL is not a scalar expression over the source columns (or does not parse)."""


def _describe(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return f"function {node.name.upper()}()"
    if isinstance(node, exp.Func) and not isinstance(node, exp.Cast):
        return f"function {node.sql_name()}()"
    return f"{type(node).__name__} ({node.sql()[:60]})"


def scalar_sql(sql: object, where: str) -> str:
    """``sql`` checked (module docstring) and written back from its parse tree; ``UnsafeSQLError`` naming ``where``
    (the table / column of the mapping) and the first node that is not allowed. Reads and fetches nothing."""
    if not isinstance(sql, str) or not sql.strip():
        raise UnsafeSQLError(f"{where}: SQL must be a non-empty string, got {sql!r}")
    try:
        tree = sqlglot.parse_one(sql)
    except sqlglot.errors.SqlglotError as e:
        raise UnsafeSQLError(f"{where}: cannot parse SQL {sql!r}: {str(e).splitlines()[0]}") from None
    for node in tree.walk():
        bad = None
        if not isinstance(node, ALLOWED):
            bad = _describe(node)
        elif isinstance(node, exp.Column) and (node.table or node.args.get("db") or node.args.get("catalog")):
            bad = f"a column of another table ({node.sql()})"
        elif isinstance(node, exp.In) and any(node.args.get(k) is not None for k in ("query", "unnest", "field")):
            bad = "IN over a query (only IN (value, ...))"
        if bad is not None:
            raise UnsafeSQLError(
                f"{where}: SQL {sql!r} may only be a scalar expression over the source columns (columns, literals, "
                "operators, CASE, CAST, IN (list), IS NULL, LIKE, BETWEEN and the functions "
                f"{sorted(f.sql_names()[0] for f in FUNCTIONS)}): found {bad}"
            )
    return tree.sql(comments=False)


def failing_rows(lf: pl.LazyFrame, sql: str, limit: int = 5) -> list[int]:
    """The first ``limit`` rows (0-based) of ``lf`` on which Polars cannot evaluate ``sql`` (a checked scalar
    expression, so a row's value depends on that row only; e.g. ``CAST('yes' AS INTEGER)``), found by bisection over
    prefixes: a few reads per row found. Empty when it evaluates on every row."""
    expr = pl.sql_expr(sql)

    def fails(frame: pl.LazyFrame) -> bool:
        try:
            frame.select(expr).collect()
        except pl.exceptions.PolarsError:
            return True
        return False

    n, rows, start = lf.select(pl.len()).collect().item(), [], 0
    while len(rows) < limit and start < n and fails(lf.slice(start)):
        lo, hi = start + 1, n  # the shortest prefix of rows start.. that fails ends at row lo - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if fails(lf.slice(start, mid - start)):
                hi = mid
            else:
                lo = mid + 1
        rows.append(lo - 1)
        start = lo
    return rows
