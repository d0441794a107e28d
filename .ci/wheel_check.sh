#!/usr/bin/env bash
# A wheel install works like a real CLI (no editable install, run from outside the repository):
#   1. build the wheel and install it into a fresh venv;
#   2. collect with a built-in template (--template instruction) from the local demo teacher (data/demo_teacher);
#   3. clean with the default refusal list (a refusal record must be removed by it);
#   4. the offline demo (examples/demo.toml, copied beside a link to data/ so its outputs land in the scratch dir).
# Dependencies (torch & co.) come from the calling environment (CI's .venv) through a .pth file, so the fresh venv
# holds only what the wheel installs and nothing is downloaded twice. Usage: .ci/wheel_check.sh (inside the CI venv).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip wheel -q --no-deps -w "$work/dist" "$repo" 2>&1 | grep -v "^WARNING: Location" || true
wheel=$(ls "$work"/dist/imitate-*.whl)
# the listing goes to a file first: `unzip -l | grep -q` under pipefail fails at random when grep exits early (SIGPIPE)
unzip -l "$wheel" > "$work/wheel.txt"
grep -q "imitate/_prompts/instruction.j2" "$work/wheel.txt" || { echo "wheel lacks the built-in templates"; exit 1; }
grep -q "imitate/_data/refusals.txt" "$work/wheel.txt" || { echo "wheel lacks data/refusals.txt"; exit 1; }
grep -q "imitate/py.typed" "$work/wheel.txt" || { echo "wheel lacks py.typed"; exit 1; }
if grep -q "safetensors" "$work/wheel.txt"; then echo "the wheel must not carry the demo models"; exit 1; fi

python -m venv "$work/venv"
deps=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
fresh=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$fresh/zz_ci_deps.pth"  # after the venv's own site-packages: the wheel's imitate wins
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
imitate="$work/venv/bin/imitate"

mkdir "$work/run" && cd "$work/run"  # outside the repository: nothing can come from the source tree
"$work/venv/bin/python" - "$fresh" <<'PY'
import sys
import imitate
from imitate.collect.templates import builtin_names
assert imitate.__file__.startswith(sys.argv[1]), f"imitate imported from {imitate.__file__}, not the wheel"
assert {"chat", "default", "instruction"} <= set(builtin_names()), builtin_names()
PY

printf '%s\n' '{"instruction": "Write 12 in words."}' '{"instruction": "Write 305 in words."}' \
    '{"instruction": "Write 4711 in words."}' > rows.jsonl
"$imitate" collect --teacher "hf:$repo/data/demo_teacher" --prompts rows.jsonl --template instruction \
    --temperature 0 --max-tokens 20 --out records.jsonl --no-progress --json > collect.json
python -c 'import json,sys; s=json.load(open("collect.json")); assert s["completed"] == 3 and s["failed"] == 0, s'
python -c 'import json; r=[json.loads(x) for x in open("records.jsonl")]; assert any(m["content"] == "Write 305 in words." for x in r for m in x["messages"]), r'

printf '%s\n' '{"id": "r1", "messages": [{"role": "user", "content": "Write 9 in words."}, {"role": "assistant", "content": "As an AI language model, I cannot write numbers."}]}' > refusal.jsonl
"$imitate" clean records.jsonl refusal.jsonl --out clean.jsonl --removed removed.jsonl --json > clean.json
python -c 'import json; s=json.load(open("clean.json")); assert s["removed"].get("refusal") == 1, s["removed"]'
test "$(wc -l < clean.jsonl)" -eq 3

mkdir -p demo/examples && cp "$repo/examples/demo.toml" demo/examples/ && ln -s "$repo/data" demo/data
"$imitate" run demo/examples/demo.toml --json > demo.json
python - <<'PY'
import json
r = json.load(open("demo.json"))
assert r["exit_code"] == 0 and all(x["status"] == "ran" for x in r["runs"]), [(x["name"], x["status"]) for x in r["runs"]]
scores = {x["name"]: x["summary"]["score"] for x in r["runs"] if x["stage"] == "eval"}
assert scores["eval.teacher"] == 1.0 and min(scores.values()) > 0.8, scores
print("wheel check: collect, clean and the demo ran from the wheel install;", scores)
PY
