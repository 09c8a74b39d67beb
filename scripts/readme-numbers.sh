#!/usr/bin/env bash
# README's numbers, measured: clones the committed HEAD into a fresh directory, runs README's
# two commands there as a new user would (the main job, its build timed apart from its
# training; then the tests, which reuse that build), and writes what they gave (machine,
# commit, times, accuracies) into README.md between its `main-job` markers, the curves into
# docs/fashion_small_cnn_sb.png, and the commands' output into docs/main-job/.
#
#   scripts/readme-numbers.sh            # both commands (about 15 minutes on 2 cores)
#   scripts/readme-numbers.sh --no-tests # the main job only; the tests' time is left as it is
#
# Uncommitted changes are not measured: commit first.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
with_tests=1
[ "${1:-}" = "--no-tests" ] && with_tests=0

# README's two commands, read from its first code block, so that what is timed is what it says
main_job=$(grep -m1 '# main job$' README.md | sed 's/[[:space:]]*# main job$//')
tests=$(grep -m1 '# tests$' README.md | sed 's/[[:space:]]*# tests$//')
[ -n "$main_job" ] && [ -n "$tests" ] || { echo "README.md: no '# main job' / '# tests' lines" >&2; exit 1; }
build=$(sed 's/cargo run --release -- .*/cargo build --release/; s/.*&& //' <<<"$main_job")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/fisherc"
cd "$work/fisherc"
commit=$(git rev-parse --short HEAD)
logs="$repo/docs/main-job"
mkdir -p "$logs"

seconds() { local start=$SECONDS; bash -c "$1" >"$2" 2>&1 || { tail -20 "$2" >&2; exit 1; }; echo $((SECONDS - start)); }

echo "readme-numbers: building ($build) in $work/fisherc" >&2
build_s=$(seconds "scripts/install-data.sh && $build" "$logs/build.log")
echo "readme-numbers: the main job" >&2
train_s=$(seconds "$main_job" "$logs/main-job.log")
if [ $with_tests = 1 ]; then
  echo "readme-numbers: the tests" >&2
  test_s=$(seconds "$tests" "$logs/tests.log")
fi
target/release/fisherc plot runs/fashion_small_cnn_sb -o "$work/curves" >/dev/null
cp "$work/curves.png" "$repo/docs/fashion_small_cnn_sb.png"

accuracy() { grep -m1 "^epoch *$1 " "$logs/main-job.log" | sed 's/.*test accuracy \([0-9.]*%\).*/\1/'; }
epochs=$(grep -c '^epoch ' "$logs/main-job.log")
minutes() { awk -v s="$1" 'BEGIN { printf "%.1f", s / 60 }'; }
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
cores=$(nproc)
isa=$(grep -qw avx512f /proc/cpuinfo && echo AVX-512 || (grep -qw avx2 /proc/cpuinfo && echo AVX2 || echo x86-64))
tests_line=""
if [ $with_tests = 1 ]; then
  passed=$(grep -o '[0-9]* passed' "$logs/tests.log" | awk '{ n += $1 } END { print n }')
  tests_line="The tests took $(minutes "$test_s") minutes ($passed tests), reusing the main job's build."
else
  tests_line=$(sed -n '/^<!-- main-job -->$/,/^<!-- \/main-job -->$/p' "$repo/README.md" | grep -o 'The tests took [^.]*\.[^.]*\.' || true)
fi

block="<!-- main-job -->
Measured by \`scripts/readme-numbers.sh\` on $(date -u +%Y-%m-%d) at commit $commit, on a fresh clone, on
$cpu ($cores cores, $isa): the main job took **$(minutes $((build_s + train_s))) minutes**
($(minutes "$build_s") to set up and build, $(minutes "$train_s") to train) and reached **$(accuracy "$epochs")** test
accuracy after epoch $epochs ($(accuracy 1) after the first). $tests_line
<!-- /main-job -->"

python3 - "$repo/README.md" "$block" <<'EOF'
import re, sys
path, block = sys.argv[1], sys.argv[2]
text = open(path).read()
pattern = re.compile(r"<!-- main-job -->.*?<!-- /main-job -->", re.S)
if not pattern.search(text):
    sys.exit(f"{path}: no <!-- main-job --> ... <!-- /main-job --> block")
open(path, "w").write(pattern.sub(lambda _: block, text, count=1))
EOF
echo "$block"
