"""Built-in text-to-SQL training data in the schema of ``gretelai/synthetic_text_to_sql``.

The default run must work offline, so instead of downloading gretel we ship a small
dataset produced by a deterministic generator. Every row is self-contained: its
``sql_context`` creates and fills exactly the tables its ``sql`` reads, and the generator
executes context + query in a fresh in-memory sqlite3 database and keeps the row only if
the query returns a non-empty result. That makes execution accuracy a meaningful metric.

    python -m qlora.data.builtin_sql --out data/sql     # writes train.jsonl and test.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import sqlite3
from contextlib import closing
from datetime import date, timedelta
from pathlib import Path

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Elif", "Farah", "Gita", "Hugo", "Ivan", "Jonas",
         "Kemi", "Liam", "Maya", "Nadia", "Omar", "Priya", "Rosa", "Sven", "Tariq", "Yuki"]
LAST = ["Adams", "Bauer", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Haddad", "Ito",
        "Jensen", "Khan", "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Silva"]
START = date(2022, 1, 1)
CITIES = ["Austin", "Boston", "Denver", "Lyon", "Madrid", "Oslo", "Porto", "Seattle", "Turin"]

# One spec per domain: a fact table (id, name, category, number, date, foreign key) and a
# dimension table (id, name, attribute). The generic templates below are written against
# these roles, so every template works in every domain and schemas stay varied.
DOMAINS = [
    dict(domain="retail", t="orders", one="order", many="orders", name=("customer", "customer name"),
         cat=("status", "status", ["shipped", "pending", "cancelled", "returned"]),
         num=("amount", "order amount", "REAL", 5, 500), date=("order_date", "order date"),
         dim=("stores", "store_id", "store_name", "store", ["Northside", "Central", "Harbor", "Uptown"]),
         attr=("city", "city", CITIES)),
    dict(domain="human resources", t="employees", one="employee", many="employees", name=("name", "employee name"),
         cat=("job_title", "job title", ["Engineer", "Analyst", "Manager", "Designer"]),
         num=("salary", "salary", "INT", 40000, 150000), date=("hire_date", "hire date"),
         dim=("departments", "dept_id", "dept_name", "department", ["Sales", "Finance", "IT", "Legal"]),
         attr=("location", "location", CITIES)),
    dict(domain="libraries", t="loans", one="loan", many="loans", name=("borrower", "borrower name"),
         cat=("genre", "genre", ["fiction", "history", "science", "poetry", "biography"]),
         num=("days_borrowed", "number of days borrowed", "INT", 1, 60), date=("loan_date", "loan date"),
         dim=("branches", "branch_id", "branch_name", "branch", ["Main", "Riverside", "Eastgate", "Hillcrest"]),
         attr=("city", "city", CITIES)),
    dict(domain="aviation", t="flights", one="flight", many="flights", name=("flight_code", "flight code"),
         cat=("destination", "destination", CITIES),
         num=("passengers", "passenger count", "INT", 40, 350), date=("departure_date", "departure date"),
         dim=("airlines", "airline_id", "airline_name", "airline", ["SkyJet", "AeroNord", "BlueWing", "SunAir"]),
         attr=("country", "country", ["USA", "France", "Spain", "Norway", "Japan"])),
    dict(domain="healthcare", t="visits", one="visit", many="visits", name=("patient_name", "patient name"),
         cat=("visit_type", "visit type", ["checkup", "emergency", "surgery", "follow-up"]),
         num=("cost", "visit cost", "REAL", 50, 5000), date=("visit_date", "visit date"),
         dim=("doctors", "doctor_id", "doctor_name", "doctor", ["Dr. Reyes", "Dr. Kim", "Dr. Moss", "Dr. Oduya"]),
         attr=("specialty", "specialty", ["cardiology", "pediatrics", "oncology", "neurology"])),
    dict(domain="education", t="grades", one="exam result", many="exam results", name=("student_name", "student name"),
         cat=("subject", "subject", ["math", "physics", "history", "biology", "art"]),
         num=("score", "score", "INT", 35, 100), date=("exam_date", "exam date"),
         dim=("schools", "school_id", "school_name", "school", ["Oakwood High", "Lincoln Academy", "Westfield School"]),
         attr=("district", "district", ["North", "South", "East", "West"])),
    dict(domain="real estate", t="listings", one="listing", many="listings", name=("address", "address"),
         cat=("property_type", "property type", ["condo", "house", "townhouse", "studio"]),
         num=("price", "price", "INT", 90000, 900000), date=("listed_date", "listing date"),
         dim=("agents", "agent_id", "agent_name", "agent", ["Ana Brooks", "Leo Park", "Mia Cruz", "Sam Wu"]),
         attr=("agency", "agency", ["HomeFirst", "KeyRealty", "UrbanNest"])),
]
STREETS = ["Oak St", "Elm Ave", "Pine Rd", "Maple Dr", "Cedar Ln", "Lake Blvd"]
AGG = {"SUM": ["total", "combined"], "AVG": ["average", "mean"],
       "MIN": ["minimum", "lowest"], "MAX": ["maximum", "highest"]}


def _name(rng: random.Random, d: dict) -> str:
    """A value for the fact table's name column, in a style that fits the domain."""
    if d["t"] == "flights":
        return f"{rng.choice(['SJ', 'AN', 'BW', 'SA'])}{rng.randint(100, 999)}"
    if d["t"] == "listings":
        return f"{rng.randint(1, 250)} {rng.choice(STREETS)}"
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _tables(rng: random.Random, d: dict, two_tables: bool) -> tuple[list[dict], list[dict]]:
    """Random fact and dimension rows. Numbers and dates are drawn without replacement so
    ORDER BY ... LIMIT and MIN/MAX have a unique gold answer (no ties). Row counts stay small
    (fewer fact rows when a second table is emitted) so context + query fit ~350 tokens."""
    n, m = rng.randint(3, 4 if two_tables else 5), rng.randint(2, 3)
    _, _, typ, lo, hi = d["num"]
    if typ == "INT":  # round big numbers (salaries, prices) to plausible steps
        step = 1 if hi <= 1000 else 500
        nums = rng.sample(range(lo, hi + 1, step), n)
    else:
        nums = [k / 100 for k in rng.sample(range(lo * 100, hi * 100), n)]
    dates = [(START + timedelta(days=k)).isoformat() for k in rng.sample(range(730), n)]  # 2022-2023
    attrs = rng.sample(d["attr"][2], m)  # distinct attributes so a dimension filter is selective
    dim = [dict(id=i + 1, name=nm, attr=attrs[i]) for i, nm in enumerate(rng.sample(d["dim"][4], m))]
    fact = [dict(id=i + 1, name=_name(rng, d), cat=rng.choice(d["cat"][2]), num=nums[i],
                 date=dates[i], fk=rng.randint(1, len(dim))) for i in range(n)]
    return fact, dim


def _a(noun: str) -> str:
    """Noun with its indefinite article ("an agent", "a store")."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _lit(v) -> str:
    """SQL literal for a Python value (names never contain quotes, but be safe)."""
    return str(v) if isinstance(v, (int, float)) else "'" + str(v).replace("'", "''") + "'"


def _context(d: dict, fact: list[dict], dim: list[dict], use_dim: bool) -> str:
    """gretel-style context: CREATE TABLE + one multi-row INSERT per table the query uses.
    The foreign-key column is only emitted when the dimension table is, to keep rows short."""
    fact_cols = [(f"{d['one'].split()[-1]}_id", "INT", "id"), (d["name"][0], "VARCHAR(50)", "name"),
                 (d["cat"][0], "VARCHAR(30)", "cat"), (d["num"][0], d["num"][2], "num"),
                 (d["date"][0], "DATE", "date")]
    tables = [(d["t"], fact_cols + [(d["dim"][1], "INT", "fk")] * use_dim, fact)]
    if use_dim:
        tables.append((d["dim"][0], [(d["dim"][1], "INT", "id"), (d["dim"][2], "VARCHAR(50)", "name"),
                                     (d["attr"][0], "VARCHAR(30)", "attr")], dim))
    out = []
    for table, cols, rows in tables:
        out.append(f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t, _ in cols)});")
        vals = ", ".join("(" + ", ".join(_lit(r[k]) for _, _, k in cols) + ")" for r in rows)
        out.append(f"INSERT INTO {table} ({', '.join(c for c, _, _ in cols)}) VALUES {vals};")
    return " ".join(out)


def _template(k: int, rng: random.Random, d: dict, fact: list[dict], dim: list[dict]):
    """Question template number k: returns (complexity, task, prompt, sql, explanation, uses_dim).
    Filter constants are picked from the generated rows so most queries match something."""
    t, many, pick = d["t"], d["many"], rng.choice
    (nm, nmd), (cat, catd, _), (num, numd), (dt, dtd) = d["name"], d["cat"], d["num"][:2], d["date"]
    (dt_, fk, dn, dnd, _), (at, atd, _) = d["dim"], d["attr"]
    r = pick(fact)
    c = _lit(r["cat"])
    if k == 0:  # WHERE with a numeric comparison
        x = sorted(f["num"] for f in fact)[rng.randint(0, len(fact) - 2)]
        q = pick([f"Which {many} have {_a(numd)} greater than {x}?",
                  f"List the {nmd} and {numd} of {many} with {numd} above {x}.",
                  f"Show all {many} where the {numd} exceeds {x}."])
        return ("basic SQL", "data retrieval", q, f"SELECT {nm}, {num} FROM {t} WHERE {num} > {x};",
                f"This query selects the {nmd} and {numd} from the {t} table for rows whose {num} is greater than {x}.", False)
    if k == 1:  # equality on a text column
        q = pick([f"Show all details of {many} with {catd} {c}.", f"Which {many} have the {catd} {c}?",
                  f"Show every {d['one']} whose {catd} is {c}."])
        return ("basic SQL", "data retrieval", q, f"SELECT * FROM {t} WHERE {cat} = {c};",
                f"This query returns all columns of the {t} table where {cat} equals {c}.", False)
    if k == 2:  # BETWEEN on dates
        a, b = sorted(rng.sample([f["date"] for f in fact], 2))
        q = pick([f"Which {many} have {_a(dtd)} between {a} and {b}?",
                  f"List {many} with {_a(dtd)} from '{a}' to '{b}' inclusive."])
        return ("basic SQL", "data retrieval", q, f"SELECT {nm}, {dt} FROM {t} WHERE {dt} BETWEEN '{a}' AND '{b}';",
                f"This query filters {t} to rows whose {dt} lies in the inclusive range '{a}' to '{b}'.", False)
    if k == 3:  # IN list
        other = pick([v for v in d["cat"][2] if v != r["cat"]])  # always two distinct values
        vs = ", ".join(_lit(v) for v in sorted([r["cat"], other]))
        q = pick([f"Show the {nmd} and {catd} of {many} whose {catd} is one of {vs}.",
                  f"Which {many} have {_a(catd)} in ({vs})?"])
        return ("basic SQL", "data retrieval", q, f"SELECT {nm}, {cat} FROM {t} WHERE {cat} IN ({vs});",
                f"This query uses IN to return {t} rows whose {cat} matches any of {vs}.", False)
    if k == 4:  # LIKE prefix
        p = r["name"][:pick([1, 2])]
        q = pick([f"Find {many} whose {nmd} starts with '{p}'.", f"Which {many} have {_a(nmd)} beginning with '{p}'?"])
        return ("basic SQL", "data retrieval", q, f"SELECT * FROM {t} WHERE {nm} LIKE '{p}%';",
                f"This query matches {nm} values that begin with '{p}' using the LIKE operator.", False)
    if k == 5:  # DISTINCT
        q = pick([f"What are the distinct {catd} values in the {t} table?",
                  f"List each unique {catd} that appears among the {many}."])
        return ("basic SQL", "data retrieval", q, f"SELECT DISTINCT {cat} FROM {t};",
                f"This query returns each different {cat} from the {t} table once.", False)
    if k == 6:  # ORDER BY + LIMIT
        n, desc = rng.randint(1, 3), pick([True, False])
        w, o = ("highest", "DESC") if desc else ("lowest", "ASC")
        q = pick([f"What are the top {n} {many} with the {w} {numd}?", f"Show the {n} {many} with the {w} {numd}."])
        return ("basic SQL", "data retrieval", q, f"SELECT {nm}, {num} FROM {t} ORDER BY {num} {o} LIMIT {n};",
                f"This query sorts {t} by {num} in {o.lower()}ending order and keeps the first {n} rows.", False)
    if k == 7:  # COUNT with a filter
        q = pick([f"How many {many} have {catd} {c}?", f"Count the {many} whose {catd} is {c}."])
        return ("aggregation", "analytics and reporting", q, f"SELECT COUNT(*) FROM {t} WHERE {cat} = {c};",
                f"This query counts the rows of {t} where {cat} is {c}.", False)
    if k == 8:  # SUM/AVG/MIN/MAX, optionally filtered
        f = pick(list(AGG)); w = pick(AGG[f])
        if pick([True, False]):
            q = pick([f"What is the {w} {numd} of {many} with {catd} {c}?", f"Find the {w} {numd} for {c} {many}."])
            return ("aggregation", "analytics and reporting", q, f"SELECT {f}({num}) FROM {t} WHERE {cat} = {c};",
                    f"This query computes the {w} {num} using {f} over {t} rows where {cat} is {c}.", False)
        q = pick([f"What is the {w} {numd} across all {many}?", f"Calculate the {w} {numd} in the {t} table."])
        return ("aggregation", "analytics and reporting", q, f"SELECT {f}({num}) FROM {t};",
                f"This query applies {f} to the {num} column of the {t} table.", False)
    if k == 9:  # GROUP BY
        f = pick(["SUM", "AVG", "COUNT"]); w = {"SUM": "total", "AVG": "average", "COUNT": "number of"}[f]
        arg, what = ("*", many) if f == "COUNT" else (num, numd)
        q = pick([f"What is the {w} {what} for each {catd}?", f"Show the {w} {what} grouped by {catd}."])
        return ("aggregation", "analytics and reporting", q, f"SELECT {cat}, {f}({arg}) FROM {t} GROUP BY {cat};",
                f"This query groups {t} by {cat} and computes {f}({arg}) for each group.", False)
    if k == 10:  # GROUP BY + HAVING, threshold just below one group's total
        # dict (not set) so the iteration order, and hence the output, never depends on hashing
        sums = {f["cat"]: sum(g["num"] for g in fact if g["cat"] == f["cat"]) for f in fact}
        x = int(pick(list(sums.values())) * 0.9)
        q = pick([f"Which {catd} values have a total {numd} above {x}?",
                  f"List each {catd} whose combined {numd} exceeds {x}."])
        return ("aggregation", "analytics and reporting", q,
                f"SELECT {cat}, SUM({num}) AS total_{num} FROM {t} GROUP BY {cat} HAVING SUM({num}) > {x};",
                f"This query sums {num} per {cat} and keeps only groups whose total exceeds {x} via HAVING.", False)
    v = _lit(pick(dim)["attr"])
    if k == 11:  # JOIN with a filter on the dimension
        q = pick([f"List the {nmd} of {many} associated with {_a(dnd)} with {atd} {v}.",
                  f"Which {many} belong to {_a(dnd)} whose {atd} is {v}? Include the {dnd} name."])
        return ("single join", "analytics and reporting", q,
                f"SELECT {t}.{nm}, {dt_}.{dn} FROM {t} JOIN {dt_} ON {t}.{fk} = {dt_}.{fk} WHERE {dt_}.{at} = {v};",
                f"This query joins {t} with {dt_} on {fk} and keeps rows where the {dnd}'s {at} is {v}.", True)
    if k == 12:  # JOIN + GROUP BY
        f = pick(["SUM", "AVG", "MAX"]); w = {"SUM": "total", "AVG": "average", "MAX": "highest"}[f]
        q = pick([f"What is the {w} {numd} for each {dnd}?", f"Show each {dnd} name with the {w} {numd} of its {many}."])
        return ("single join", "analytics and reporting", q,
                f"SELECT {dt_}.{dn}, {f}({t}.{num}) FROM {t} JOIN {dt_} ON {t}.{fk} = {dt_}.{fk} GROUP BY {dt_}.{dn};",
                f"This query joins {t} and {dt_} on {fk}, groups by {dn} and computes {f} of {num} per {dnd}.", True)
    if k == 13:  # scalar subquery
        q = pick([f"Which {many} have {_a(numd)} above the average {numd}?",
                  f"List {many} whose {numd} is higher than the overall average."])
        return ("subqueries", "analytics and reporting", q,
                f"SELECT {nm}, {num} FROM {t} WHERE {num} > (SELECT AVG({num}) FROM {t});",
                f"This query uses a subquery to compute the average {num} and returns {t} rows above it.", False)
    # k == 14: IN subquery over the dimension table
    q = pick([f"List the {nmd} of {many} whose {dnd} has {atd} {v}.",
              f"Using a subquery, find {many} linked to {_a(dnd)} with {atd} {v}."])
    return ("subqueries", "analytics and reporting", q,
            f"SELECT {nm} FROM {t} WHERE {fk} IN (SELECT {fk} FROM {dt_} WHERE {at} = {v});",
            f"This query selects {t} rows whose {fk} is in the set of {dt_} ids with {at} = {v}.", True)


N_TEMPLATES = 15
JOIN_TEMPLATES = (11, 12, 14)  # the templates whose query reads the dimension table too


def run_sql(context: str, sql: str) -> list[tuple]:
    """Execute ``context`` then ``sql`` in a fresh in-memory sqlite3 database; return the rows."""
    with closing(sqlite3.connect(":memory:")) as con:
        con.executescript(context)
        return con.execute(sql).fetchall()


def _row(rng: random.Random, k: int) -> dict:
    """One verified row for template k: redraw until the query runs and returns a real answer
    (a non-empty result that is not just NULL/zero, e.g. AVG over no rows or COUNT = 0)."""
    for _ in range(100):
        d = rng.choice(DOMAINS)
        fact, dim = _tables(rng, d, k in JOIN_TEMPLATES)
        cx, task, prompt, sql, expl, use_dim = _template(k, rng, d, fact, dim)
        ctx = _context(d, fact, dim, use_dim)
        rows = run_sql(ctx, sql)
        if rows and any(v not in (None, 0) for r in rows for v in r):
            return dict(domain=d["domain"], sql_complexity=cx, sql_task_type=task, sql_prompt=prompt,
                        sql_context=ctx, sql=sql, sql_explanation=expl)
    raise RuntimeError(f"template {k} never produced a non-empty result")


def generate(seed: int = 0, n_train: int = 400, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    """Deterministically build (train, test) lists of gretel-schema rows.

    Templates are assigned round-robin in both splits, so test has the same query-type mix
    as train; a row whose (sql_prompt, sql_context) was already emitted is skipped, so the
    splits are disjoint. Ids run 1..n_train+n_test across the two splits.
    """
    rng, seen, rows, i = random.Random(seed), set(), [], 0
    while len(rows) < n_train + n_test:
        r = _row(rng, i % N_TEMPLATES)
        i += 1
        if (r["sql_prompt"], r["sql_context"]) not in seen:
            seen.add((r["sql_prompt"], r["sql_context"]))
            rows.append({"id": len(rows) + 1, **r})
    return rows[:n_train], rows[n_train:]


def to_jsonl(rows: list[dict]) -> str:
    """Serialise rows one JSON object per line (the exact bytes shipped in data/sql)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> None:
    """CLI: write train.jsonl and test.jsonl into --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/sql")
    for flag, default in (("--seed", 0), ("--n-train", 400), ("--n-test", 100)):
        ap.add_argument(flag, type=int, default=default)
    a = ap.parse_args(argv)
    train, test = generate(a.seed, a.n_train, a.n_test)
    (out := Path(a.out)).mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text(to_jsonl(rows), encoding="utf-8", newline="\n")
        print(f"wrote {len(rows)} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
