"""clients/typescript/src/gen must be exactly what buf and protoc-gen-es make from proto/ now.

The committed TypeScript client goes stale silently when a contract changes and nobody runs
`npm run generate`; this test regenerates into a temporary directory and compares. It needs the
npm dependencies (`npm ci` in clients/typescript, as .ci/run does): without them it fails.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "typescript"


def _files(base: Path) -> dict[str, Path]:
    return {str(p.relative_to(base)): p for p in base.rglob("*") if p.is_file()}


def test_typescript_gen_is_fresh(tmp_path: Path) -> None:
    buf = shutil.which("buf")
    plugin = CLIENT / "node_modules" / ".bin" / "protoc-gen-es"
    if buf is None:
        pytest.fail("buf not installed: pip install -e '.[dev]' provides it (buf-bin)")
    if not plugin.exists():
        pytest.fail(f"npm dependencies are missing: run `npm ci` in {CLIENT}")
    # The committed template, pointed at absolute paths and a scratch output directory.
    template = (CLIENT / "buf.gen.yaml").read_text()
    template = template.replace("directory: ../../proto", f"directory: {ROOT / 'proto'}")
    template = template.replace("local: node_modules/.bin/protoc-gen-es", f"local: {plugin}")
    template = template.replace("out: src/gen", f"out: {tmp_path / 'gen'}")
    (tmp_path / "buf.gen.yaml").write_text(template)
    subprocess.run([buf, "generate", "--template", str(tmp_path / "buf.gen.yaml")], cwd=CLIENT, check=True)
    fresh, committed = _files(tmp_path / "gen"), _files(CLIENT / "src" / "gen")
    assert sorted(fresh) == sorted(committed), "TypeScript gen has missing or extra files: npm run generate"
    stale = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], shallow=False)]
    assert not stale, f"clients/typescript/src/gen is stale ({stale}): run `npm run generate` there"
