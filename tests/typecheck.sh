#!/usr/bin/env bash
# Type-check the TensorRT modules against the TensorRT 10.13 Python API without TensorRT installed.
#
# The API comes from the `tensorrt-stubs` package (stubs generated from the 10.13 bindings), kept in the
# git-ignored .stubs/ folder. Five of its signatures are not valid Python (four parameters named `in`, one
# parameter without a default after defaulted ones); they are patched before mypy reads them. The stubs have
# other, harmless faults (e.g. a module variable `bool` that shadows the builtin in annotations), so mypy reports
# errors only in the modules listed below and follows everything they import silently.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
STUBS_VERSION="10.13.0.35.1"
STUBS=".stubs"
MODULES=(
    sdtrt.runtime.backends.trt_compat
    sdtrt.runtime.backends.trt_refit
    sdtrt.runtime.backends.tensorrt
    sdtrt.export.trt_builder
    sdtrt.export.build
    sdtrt.export.engine_check
)

if [ ! -f "$STUBS/tensorrt-stubs-$STUBS_VERSION" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip install -q --no-deps --disable-pip-version-check --target "$tmp" "tensorrt-stubs==$STUBS_VERSION"
    rm -rf "$STUBS"
    mkdir -p "$STUBS/src"
    cp -r "$tmp/tensorrt" "$tmp/tensorrt_bindings" "$STUBS/"
    "$PY" - "$STUBS/tensorrt_bindings/tensorrt.pyi" <<'EOF'
import re
import sys

path = sys.argv[1]
text = open(path, encoding="utf-8").read()
text, renamed = re.subn(r"\bin: list\[", "in_: list[", text)
text, defaulted = re.subn(r"power: Weights = None, channel_axis: int\)", "power: Weights = None, channel_axis: int = ...)", text)
if (renamed, defaulted) != (4, 1):
    sys.exit(f"tensorrt-stubs changed: expected 4 + 1 syntax fixes, made {renamed} + {defaulted}; update {sys.argv[0]}")
open(path, "w", encoding="utf-8").write(text)
EOF
    touch "$STUBS/tensorrt-stubs-$STUBS_VERSION"
fi
# mypy finds the package under its import name through a link to the repository root.
ln -sfn ../.. "$STUBS/src/sdtrt"

cat >"$STUBS/mypy.ini" <<EOF
[mypy]
python_version = 3.11
mypy_path = $STUBS:$STUBS/src
ignore_missing_imports = True
follow_imports = silent

[mypy-tensorrt.*,tensorrt_bindings.*]
ignore_errors = True
EOF

args=()
for module in "${MODULES[@]}"; do args+=(-m "$module"); done
"$PY" -m mypy --config-file "$STUBS/mypy.ini" "${args[@]}"
echo "typecheck: ${#MODULES[@]} TensorRT modules pass mypy against tensorrt-stubs $STUBS_VERSION"
