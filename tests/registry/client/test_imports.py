"""The client and the CLI need none of the server's packages, nor torch: `pip install deltastore`
without extras is enough for them, and a command that needs an extra says which one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("fastapi", "sqlalchemy", "alembic", "uvicorn", "boto3", "psycopg", "torch", "triton", "transformers")

# Makes the extras' packages impossible to import, as on a machine without the extras.
BLOCK_EXTRAS = textwrap.dedent(f"""
    import importlib.abc, sys
    class _NoExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, _NoExtras())
""")


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_EXTRAS + textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_the_client_the_cli_and_the_delta_reader_import_no_server_package_and_no_torch(llama_pair, tmp_path):
    from codec.compress import CompressOptions, compress

    delta = tmp_path / "d.bdelta"
    compress(*llama_pair, delta, CompressOptions(base_name="org/tiny"))
    result = _python(
        """
        import json, sys
        from registry.client import RegistryApi, parse_ref
        import cli.main
        from codec.format import DeltaFile
        with DeltaFile.open(sys.argv[1]) as delta:
            codec = delta.metadata["codec"]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in
                       ("fastapi", "sqlalchemy", "alembic", "uvicorn", "boto3", "psycopg", "torch", "triton"))
        print(json.dumps({"codec": codec, "heavy": heavy, "ref": str(parse_ref("acme/math:prod"))}))
        """,
        str(delta),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"codec": "bitdelta", "heavy": [], "ref": "acme/math:prod"}


def test_serve_without_the_server_extra_says_which_extra_to_install(tmp_path):
    result = _python(
        """
        import sys
        from cli.main import app
        sys.argv = ["deltactl", "serve", "--data-dir", sys.argv[1]]
        app()
        """,
        str(tmp_path / "data"),
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: missing extra: this command needs ")
    assert "pip install 'deltastore[server]'" in result.stderr and result.stderr.count("\n") == 1
