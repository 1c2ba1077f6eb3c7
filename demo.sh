#!/usr/bin/env bash
# Submit an image as an async task, follow its progress, download output_video.mp4 here.
#
#   ./demo.sh /path/to/image.jpg [name=value ...]       e.g. ./demo.sh cat.jpg fps=8 motion_bucket_id=180
#
# API_URL names the service (`make run` or the compose stack); unset, http://localhost:<PORT> with PORT from the
# environment or from the .env next to this script (as the service reads it), else 5013. API_KEY, when set (or
# in that .env: its first key), is sent as a bearer token. Needs curl and python3.
set -euo pipefail

dotenv() {  # dotenv NAME: the value .env gives NAME ("" if none); KEY=value lines, quotes and comments allowed
    local file="${DOTENV:-$(dirname "$0")/.env}"
    [ -f "$file" ] || return 0
    python3 - "$file" "$1" <<'PY'
import shlex, sys
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line.startswith("export "):
        line = line[7:]
    key, sep, value = line.partition("=")
    if sep and key.strip() == sys.argv[2]:
        words = shlex.split(value, comments=True)
        print(words[0] if words else "")
PY
}

PORT="${PORT:-$(dotenv PORT)}"
API_KEY="${API_KEY:-$(dotenv API_KEY)}"
API_KEY="${API_KEY%%,*}"
API_URL="${API_URL:-http://localhost:${PORT:-5013}}"
OUTPUT="${OUTPUT:-output_video.mp4}"
image="${1:?usage: $0 /path/to/image.jpg [name=value ...]}"
shift
[ -f "$image" ] || { echo "demo.sh: no such file: $image" >&2; exit 2; }

auth=()
[ -n "${API_KEY:-}" ] && auth=(-H "Authorization: Bearer $API_KEY")
fields=()
for param in "$@"; do fields+=(-F "$param"); done

json() {  # json FIELD.PATH < document: print one value ("" for null)
    python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)' "$1"
}

body=$(curl -sS "${auth[@]}" -X POST "$API_URL/generate" -H "Prefer: respond-async" -F "image=@$image" \
    "${fields[@]}" -w '\n%{http_code}')
code=${body##*$'\n'}
body=${body%$'\n'*}
if [ "$code" != 202 ]; then
    echo "demo.sh: submission failed ($code): $body" >&2
    exit 1
fi
task_id=$(json task_id <<<"$body")
echo "task $task_id queued (seed $(json seed <<<"$body"))"

while true; do
    status=$(curl -sS "${auth[@]}" "$API_URL/status/$task_id")
    state=$(json status <<<"$status")
    case "$state" in
        queued) echo "queued, position $(json queue_position <<<"$status")" ;;
        started) echo "started: $(json progress.phase <<<"$status") $(json progress.step <<<"$status")/$(json progress.total <<<"$status")" ;;
        finished) break ;;
        failed|canceled) echo "task $state: $(json error.message <<<"$status")" >&2; exit 1 ;;
        *) echo "demo.sh: unexpected answer: $status" >&2; exit 1 ;;
    esac
    sleep "${POLL_SECONDS:-1}"
done

curl -sS -f "${auth[@]}" -o "$OUTPUT" "$API_URL/results/$task_id"
echo "saved $OUTPUT ($(wc -c <"$OUTPUT") bytes)"
