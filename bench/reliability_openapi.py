"""Schemathesis against the registry's OpenAPI document, long run (not a test): every operation,
examples + coverage + fuzzing + stateful phases, with auth off, with an admin token, with no token
and with a bogus one, on SQLite and PostgreSQL. Prints cases generated and failures per run.

    nice -n 10 python bench/reliability_openapi.py --max-examples 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability.test_openapi import RUNS, schemathesis_run  # noqa: E402
from tests.support.harness import RegistryProcess, migrate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg-url", default=os.environ.get("DELTASTORE_TEST_PG_URL"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    databases = [("sqlite", None)] + ([("postgres", args.pg_url)] if args.pg_url else [])
    rows = []
    for label, pg_url in databases:
        for run, (settings, headers) in RUNS.items():
            work = Path(tempfile.mkdtemp(prefix="ds-openapi-"))
            env = {
                "DELTASTORE_DATA_DIR": str(work / "data"),
                **{f"DELTASTORE_{k.upper()}": v for k, v in settings.items()},
            }
            cleanup = None
            if pg_url:
                from sqlalchemy import create_engine, text
                from sqlalchemy.engine import make_url

                name = f"ds_st_{uuid.uuid4().hex[:8]}"
                admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                env["DELTASTORE_DATABASE_URL"] = (
                    make_url(pg_url).set(database=name).render_as_string(hide_password=False)
                )

                def cleanup(admin=admin, name=name):
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    admin.dispose()

            migrate(env)
            try:
                with RegistryProcess(env, log_path=work / "server.log") as server:
                    code, output, generated = schemathesis_run(
                        server.url,
                        max_examples=args.max_examples,
                        seed=args.seed,
                        headers=headers,
                        report_dir=work,
                        timeout=3600,
                    )
            finally:
                if cleanup:
                    cleanup()
            failures = re.findall(r"❌ (ST\d+ [^:]+): (\d+)", output)
            server_errors = sum(int(n) for name, n in failures if name.startswith("ST101"))
            operations = re.search(r"Tested: (\d+)", output)
            row = {
                "database": label,
                "run": run,
                "exit_code": code,
                "cases": generated,
                "operations": int(operations.group(1)) if operations else None,
                "failures": {name: int(n) for name, n in failures},
                "server_errors": server_errors,
                "tracebacks_in_log": (work / "server.log").read_text().count("Traceback"),
            }
            if code != 0:
                (work / "schemathesis.txt").write_text(output)
                row["output"] = str(work / "schemathesis.txt")
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nschemathesis, {args.max_examples} examples per operation and phase (seed {args.seed})")
    print(
        f"{'db':<9} {'run':<22} {'ops':>4} {'cases':>7} {'5xx':>4} "
        f"{'other failures':>15}   goal: 0 server errors, all responses conform"
    )
    for r in rows:
        other = sum(n for name, n in r["failures"].items() if not name.startswith("ST101"))
        print(
            f"{r['database']:<9} {r['run']:<22} {r['operations'] or '-':>4} "
            f"{r['cases']:>7} {r['server_errors']:>4} {other:>15}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
