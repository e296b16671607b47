"""Regenerates gen/ from proto/: Python messages, gRPC stubs and mypy-protobuf stubs.

Run from anywhere: `python proto/generate.py`. `tests/unit/gen_fresh_test.py`
calls `generate(tmpdir)` and fails when the committed gen/ differs.

protoc names Python modules after the proto path (`aetherops.correlation.v1`),
which would collide with the core package `aetherops`; so, like temporalio's
generator, we rewrite the generated imports to live under the `gen` package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "gen"

_IMPORT_RE = re.compile(r"^(from|import) aetherops\.", re.MULTILINE)
# Only module references (…_pb2 / …_pb2_grpc), never the proto names inside strings such as
# the method path "/aetherops.correlation.v1.CorrelationService/IngestAlert".
_QUALIFIED_RE = re.compile(r"(?<![\w./])aetherops\.(common|correlation|runbook|capacity|events)\.v1\.(?=\w+_pb2)")


def _proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def _rewrite(text: str) -> str:
    text = _IMPORT_RE.sub(lambda m: f"{m.group(1)} gen.aetherops.", text)
    # .pyi stubs refer to other modules by fully qualified name.
    return _QUALIFIED_RE.sub(lambda m: f"gen.aetherops.{m.group(1)}.v1.", text)


def generate(out_dir: Path) -> None:
    """Writes the generated package (gen/...) into out_dir, replacing what is there."""
    import grpc_tools

    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        include = Path(grpc_tools.__file__).parent / "_proto"
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={raw_dir}",
            f"--grpc_python_out={raw_dir}",
            f"--mypy_out={raw_dir}",
            f"--mypy_grpc_out={raw_dir}",
            *[str(p.relative_to(PROTO_DIR)) for p in _proto_files()],
        ]
        subprocess.run(cmd, check=True, cwd=PROTO_DIR)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "__init__.py").write_text(
            '"""Generated protobuf and gRPC modules; never edit, run proto/generate.py."""\n'
        )
        for path in sorted(raw_dir.rglob("*")):
            if path.is_dir():
                continue
            target = out_dir / path.relative_to(raw_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_rewrite(path.read_text()))
        for folder in sorted(p for p in out_dir.rglob("*") if p.is_dir()):
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
        (out_dir / "py.typed").write_text("")


if __name__ == "__main__":
    generate(GEN_DIR)
    print(f"generated {GEN_DIR}")
